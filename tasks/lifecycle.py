"""Status transitions and audit events for a request (each one a row in the hash-chained log)."""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from typing import Any, Iterator

from prefect import task

from db import requests_repo
from db.models import IN_PROGRESS
from db.requests_repo import LeaseLost  # noqa: F401 - the flow catches it: a run that lost its claim stops
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
    runner: str | None = None,
) -> str:
    """`runner`: the claim this change is made under (refused once another run took the ticket up)."""
    settings = settings_for(home, profile)
    with settings.db_session() as session:
        request = requests_repo.get_request(session, ticket_id)
        if request is None:
            raise LookupError(f"no request with ticket id {ticket_id!r}")
        requests_repo.set_status(session, request, status, reason_code=reason_code, detail=detail,
                                 audit_payload=audit_payload, runner=runner)
    return status


@task(name="runnable-tickets")
def runnable_tickets(home: str, profile: str) -> list[dict]:
    """Tickets a run may take now (received and unheld, or with an expired lease), earliest due date first: id,
    method, status, due date, days left and which may be batched together (no subject data)."""
    from datetime import datetime, timezone

    from expunge.requests import RequestSpec
    from tasks.batch import batch_key

    settings = settings_for(home, profile)
    now = datetime.now(timezone.utc)
    with settings.db_session() as session:
        rows = [(r, RequestSpec.model_validate_json(r.spec_json)) for r in requests_repo.runnable_requests(session)]
        return [{"ticket_id": r.ticket_id, "method": spec.method, "status": r.status,
                 "due_at": r.due_at.isoformat(), "days_left": round((r.due_at - now).total_seconds() / 86400, 1),
                 # tickets with one key may share an assistant: a keyed hash, so no subject or corpus detail leaves
                 "batch_key": _keyed(settings, batch_key(spec, r.target_model_uri or ""))}
                for r, spec in rows]


def _keyed(settings, key: tuple | None) -> str | None:
    import json

    from expunge_ml.corpus import keyed_hash

    return None if key is None else keyed_hash(settings.hmac_key(), json.dumps(key))[:16]


def new_runner_id() -> str:
    """Who holds a claim: host, process and a random part (two runs in one process differ too)."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@task(name="claim-ticket", retries=2, retry_delay_seconds=1)
def claim_ticket(home: str, profile: str, ticket_id: str, runner: str) -> dict | None:
    """Take the ticket for this run (`requests_repo.claim`): {"interrupted_step": the step a lost run was in, or
    None}; None when another runner holds it."""
    settings = settings_for(home, profile)
    with settings.db_session() as session:
        before = requests_repo.get_request(session, ticket_id)
        step = before.status if before is not None and before.status in IN_PROGRESS else None
        if requests_repo.claim(session, ticket_id, runner, settings.lease_seconds) is None:
            return None
    return {"interrupted_step": step}


def end_lease_now(flow, flow_run, state) -> None:
    """Prefect on_crashed / on_cancellation hook of `process_request`: the run will not renew its lease, so let it
    run out now and record why (a `kill -9` runs no hook: the lease runs out by itself)."""
    _end_leases(flow_run, state, [flow_run.parameters["ticket_id"]])


def end_batch_leases_now(flow, flow_run, state) -> None:
    """`process_batch`'s hook: `end_lease_now` for each of its tickets."""
    _end_leases(flow_run, state, list(flow_run.parameters["ticket_ids"]))


def _end_leases(flow_run, state, ticket_ids: list[str]) -> None:
    params = flow_run.parameters
    settings = settings_for(params["home"], params.get("profile", "demo"))
    with settings.db_session() as session:
        for ticket_id in ticket_ids:
            if requests_repo.end_lease(session, ticket_id):
                requests_repo.record_event(session, ticket_id, "run_interrupted",
                                           {"state": state.type.value, "flow_run_id": str(flow_run.id)})


@task(name="return-to-queue", retries=2, retry_delay_seconds=1)
def return_to_queue(home: str, profile: str, ticket_id: str, runner: str, reason_code: str, detail: str) -> None:
    """Back to `received` and let go (a batch split the ticket out): the next run, alone, may take it at once."""
    settings = settings_for(home, profile)
    with settings.db_session() as session:
        request = requests_repo.get_request(session, ticket_id)
        requests_repo.set_status(session, request, "received", reason_code=reason_code, detail=detail, runner=runner)
        requests_repo.release_claim(session, request, runner)


@contextlib.contextmanager
def lease_kept(home: str, profile: str, ticket_id: str, runner: str) -> Iterator[None]:
    """Renew the runner's lease every third of its length while the block runs (a daemon thread: a crashed
    process stops renewing, and the ticket is free again one lease later)."""
    settings = settings_for(home, profile)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(settings.lease_seconds / 3):
            try:
                with settings.db_session() as session:
                    if not requests_repo.renew_lease(session, ticket_id, runner, settings.lease_seconds):
                        return  # taken up by another run: our next transition is refused
            except Exception:  # a DB hiccup: try again at the next tick, the lease has time left
                continue

    thread = threading.Thread(target=renew, name=f"lease-{ticket_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@task(name="audit-event", retries=2, retry_delay_seconds=1)
def audit_event(home: str, profile: str, ticket_id: str | None, event_type: str, payload: dict[str, Any]) -> None:
    settings = settings_for(home, profile)
    with settings.db_session() as session:
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
    with settings.db_session() as session:
        request = requests_repo.get_request(session, ticket_id)
        request.result_model_uri = model_uri
        request.metrics_json = json.dumps({**key, "gates": gates}, sort_keys=True)
