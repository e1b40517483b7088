"""Rolling the `champion` back to a version it was built on.

A version contains the erasures of every version on its lineage (`registry.lineage`): serving an older one undoes
the erasures made since. Each of their tickets is therefore reopened (status `reopened`, due date kept), so an
erasure is never silently undone: it shows in `expunge status --overdue` until it is filed again and served.
"""
from __future__ import annotations

import json

from prefect import get_run_logger, task
from sqlalchemy import select

from db import requests_repo
from db.models import AuditEvent
from models_registry.registry import (
    ASSISTANTS_DELETED_TAG, CHAMPION, ModelNotFound, ModelRef, current_alias, lineage, parse_model_uri,
    roll_back_champion, version_tags,
)
from tasks.context import settings_for

ROLLBACK_EVENTS = ("rollback_intent", "rolled_back")


def _refused(reason_code: str, message: str) -> dict:
    return {"refused": {"reason_code": reason_code, "message": message}}


@task(name="plan-rollback")
def plan_rollback(home: str, profile: str, model_name: str, to_version: str | None) -> dict:
    """{"from": champion URI, "to": URI, "reopen": [released tickets erased after `to`]}, or {"refused": …}.
    `to_version` must be on the champion's lineage; default: the version the champion was built on."""
    settings = settings_for(home, profile)
    champion = current_alias(model_name, CHAMPION)
    if champion is None:
        return _refused("no_champion", f"{model_name} has no champion to roll back")
    try:
        path = lineage(champion.uri)
    except ModelNotFound as exc:
        return _refused("unknown_model", str(exc))
    older = [row for row in path[1:] if row["uri"].startswith(f"models:/{model_name}/")]
    if not older:
        return _refused("no_earlier_version", f"{champion.uri} was not built on an earlier version of {model_name}")
    wanted = ModelRef(model_name, str(to_version)).uri if to_version else older[0]["uri"]
    position = next((i for i, row in enumerate(path) if row["uri"] == wanted), None)
    if position is None or position == 0:
        ancestors = ", ".join(row["uri"] for row in older)
        return _refused("not_an_ancestor", f"{wanted} is not a version {champion.uri} was built on ({ancestors})")
    wanted_name, _, wanted_version = parse_model_uri(wanted)
    deleted = version_tags(ModelRef(wanted_name, wanted_version)).get(ASSISTANTS_DELETED_TAG)
    if deleted:
        return _refused("assistants_deleted", f"{wanted}'s assistants were deleted when {deleted} consolidated it: "
                        "it can no longer be served")
    undone = {ticket for row in path[:position] for ticket in row["ticket_ids"]}
    with settings.db_session() as session:
        reopen = sorted(ticket for ticket in undone
                        if (request := requests_repo.get_request(session, ticket)) is not None
                        and request.status == "released")
    return {"from": champion.uri, "to": wanted, "reopen": reopen}


@task(name="interrupted-rollback")
def interrupted_rollback(home: str, profile: str) -> dict | None:
    """The rollback a crash left between its intent and its end (aliases perhaps moved, tickets perhaps not yet
    reopened): the intent's payload, or None."""
    settings = settings_for(home, profile)
    with settings.db_session() as session:
        last = session.scalars(select(AuditEvent).where(AuditEvent.event_type.in_(ROLLBACK_EVENTS))
                               .order_by(AuditEvent.seq.desc()).limit(1)).first()
        if last is None or last.event_type != "rollback_intent":
            return None
        return json.loads(last.payload_json)


@task(name="move-champion-back")
def move_champion_back(home: str, profile: str, plan: dict, reviewer: str) -> None:
    settings_for(home, profile)
    name, _, version = parse_model_uri(plan["to"])
    to = ModelRef(name, version)
    left = roll_back_champion(to.name, to, {"expunge.rolled_back": "true", "expunge.rolled_back_by": reviewer})
    get_run_logger().info("champion of %s: %s → %s", to.name, left.uri if left else plan["from"], to.uri)


@task(name="reopen-ticket", retries=2, retry_delay_seconds=1)
def reopen_ticket(home: str, profile: str, ticket_id: str, audit: dict) -> bool:
    """`released` → `reopened` (idempotent: a ticket reopened before an interruption is left as it is)."""
    settings = settings_for(home, profile)
    with settings.db_session() as session:
        request = requests_repo.get_request(session, ticket_id)
        if request is None or request.status != "released":
            return False
        requests_repo.set_status(session, request, "reopened", reason_code="rolled_back", audit_payload=audit)
        return True
