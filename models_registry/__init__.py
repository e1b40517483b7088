"""MLflow ownership: registering base and unlearned models, resolving `models:/` URIs, aliases."""
