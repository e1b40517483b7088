"""Pure ML core of expunge: no Prefect, MLflow or SQLAlchemy imports."""
