"""Write the ticket's evidence report, attach it to the MLflow run and show it as a Prefect artifact."""
from __future__ import annotations

import mlflow
from prefect import task
from prefect.artifacts import create_markdown_artifact

from expunge.report import render_report
from tasks.context import settings_for


@task(name="evidence-report")
def evidence_report(home: str, profile: str, ticket_id: str, mlflow_run_id: str | None,
                    artifact_path: str = "evidence_report") -> dict:
    """`artifact_path`: where in the MLflow run (a batch's run holds one report per ticket)."""
    settings = settings_for(home, profile)
    paths = render_report(settings, ticket_id)
    if mlflow_run_id:
        with mlflow.start_run(run_id=mlflow_run_id):
            for path in paths.values():
                mlflow.log_artifact(str(path), artifact_path=artifact_path)
    create_markdown_artifact(
        key=f"evidence-{ticket_id.lower().replace('_', '-').replace('.', '-')}",
        markdown=paths["markdown"].read_text(),
        description=f"Evidence report for ticket {ticket_id}",
    )
    return {name: str(path) for name, path in paths.items()}
