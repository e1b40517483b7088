"""Status transitions and audit events for a request (each one a row in the hash-chained log)."""
from __future__ import annotations

from typing import Any

from prefect import task

from db import requests_repo, session_scope
from tasks.context import settings_for


@task(name="transition", retries=2, retry_delay_seconds=1)
def transition(
    home: str,
    profile: str,
    ticket_id: str,
    status: str,
    reason_code: str | None = None,
    detail: str | None = None,
    audit_payload: dict[str, Any] | None = None,
) -> str:
    settings = settings_for(home, profile)
    with session_scope(settings.db_url) as session:
        request = requests_repo.get_request(session, ticket_id)
        if request is None:
            raise LookupError(f"no request with ticket id {ticket_id!r}")
        requests_repo.set_status(
            session, request, status, reason_code=reason_code, detail=detail, audit_payload=audit_payload
        )
    return status


@task(name="audit-event", retries=2, retry_delay_seconds=1)
def audit_event(home: str, profile: str, ticket_id: str, event_type: str, payload: dict[str, Any]) -> None:
    settings = settings_for(home, profile)
    with session_scope(settings.db_url) as session:
        requests_repo.record_event(session, ticket_id, event_type, payload)


@task(name="store-outcome", retries=2, retry_delay_seconds=1)
def store_outcome(home: str, profile: str, ticket_id: str, model_uri: str, metrics: dict, gates: list) -> None:
    """Keep the key numbers on the request row, for `expunge status` and `status --json`."""
    import json

    key = {
        f"{model}_{split}_{name}": round(float(values[metric]), 4)
        for model, splits in metrics.items()
        for split, values in splits.items()
        for name, metric in (("rougeL", "rougeL_recall"), ("prob", "answer_prob"), ("facts", "fact_recall"))
        if values.get(metric) is not None  # fact recall: only where the answers carry facts
    }
    settings = settings_for(home, profile)
    with session_scope(settings.db_url) as session:
        request = requests_repo.get_request(session, ticket_id)
        request.result_model_uri = model_uri
        request.metrics_json = json.dumps({**key, "gates": gates}, sort_keys=True)
