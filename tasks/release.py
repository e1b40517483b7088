"""Human approval: a reviewer releases a gated model version as `champion`, or declines it.

Only a `completed` request (every gate passed) can be decided. Approving a version that was built on an
older champion would silently drop whatever the current champion changed since (e.g. an earlier erasure
whose assistant the newer composite does not stack), so that is refused as stale: re-run the request.
Approving a version whose quantization gates passed with their threshold inside the worst attack's 90 %
interval (the pass could be the draw of a dozen answers) needs the reviewer to say so (`accept_unsettled`);
the accepted gates are recorded with the approval.
Refusals are audited too: an auditor sees every attempt, not only the successful ones.
"""
from __future__ import annotations

import json

from prefect import get_run_logger, task

from db import requests_repo
from expunge_ml.gates import unsettled_gates
from models_registry.registry import (
    CHAMPION,
    ModelRef,
    aliases_of,
    current_alias,
    parse_model_uri,
    pin,
    promote_to_champion,
    version_tags,
    withdraw_challenger,
)
from tasks.context import settings_for

DECISIONS = ("approve", "reject")


# Tickets a reviewer may decline although nothing was released: closing them purges the subject from the row.
CLOSABLE_UNRELEASED = ("failed_gates", "needs_review")


def _refused(reason_code: str, message: str) -> dict:
    return {"refused": {"reason_code": reason_code, "message": message}}


def _refuse(settings, ticket_id: str, decision: str, reviewer: str, reason_code: str, message: str) -> dict:
    """A refusal about an existing request: audited, so the log shows attempts as well as decisions."""
    with settings.db_session() as session:
        requests_repo.record_event(session, ticket_id, "release_refused", {
            "decision": decision, "reviewer": reviewer, "reason_code": reason_code,
        })
    return _refused(reason_code, message)


def _parent_in_same_model(ref: ModelRef, tags: dict[str, str]) -> ModelRef | None:
    parent = tags.get("expunge.parent_uri", "")
    if not parent.startswith("models:/"):
        return None  # built on a local directory or hub id: no registry lineage to protect
    name, alias, version = parse_model_uri(parent)
    if name != ref.name:
        return None
    return ModelRef(name, version) if version else pin(parent)


@task(name="check-release")
def check_release(home: str, profile: str, ticket_id: str, decision: str, reviewer: str,
                  accept_unsettled: bool = False) -> dict:
    """{"model_uri": …, "unsettled_gates": […]} when `decision` may be applied, else {"refused": {reason_code,
    message}} (audited as `release_refused`). Refusals are results, not task failures: a user error must not
    print a traceback."""
    settings = settings_for(home, profile)
    if decision not in DECISIONS:
        return _refused("bad_decision", f"decision must be one of {DECISIONS}, got {decision!r}")
    if not reviewer.strip():
        return _refused("no_reviewer", "a release decision needs the reviewer's name (--reviewer)")
    with settings.db_session() as session:
        request = requests_repo.get_request(session, ticket_id)
        if request is None:
            return _refused("unknown_ticket", f"no request with ticket id {ticket_id!r}")
        status, model_uri = request.status, request.result_model_uri
        # The verdicts come from the hash-chained log, not from the row or the version's tags, which a writer
        # with DB or registry access could edit.
        evaluated = requests_repo.latest_event(session, ticket_id, "evaluated") or {}
        registered = requests_repo.latest_event(session, ticket_id, "model_registered") or {}
        gates = evaluated.get("gates", [])
        row_gates = json.loads(request.metrics_json).get("gates", []) if request.metrics_json else []
        # a batch version releases its other tickets with this one: their unsettled gates need saying too
        for mate in (requests_repo.completed_on_model(session, model_uri, leave_out=ticket_id) if model_uri else []):
            row_gates += [{**g, "gate": f"{g['gate']} ({mate})"}
                          for g in (requests_repo.latest_event(session, mate, "evaluated") or {}).get("gates", [])]
    if decision == "reject" and status in CLOSABLE_UNRELEASED:  # close it, so its subject is purged too
        return {"model_uri": model_uri and pin(model_uri).uri, "unsettled_gates": []}
    if status != "completed":
        return _refuse(settings, ticket_id, decision, reviewer, "not_releasable",
                      f"ticket {ticket_id} is {status}: only a completed request (every gate passed) can be "
                      + ("approved" if decision == "approve" else
                         f"declined, or one that is {' or '.join(CLOSABLE_UNRELEASED)}"))
    ref = pin(model_uri)
    tags = version_tags(ref)
    audited_pass = bool(gates) and all(g["passed"] for g in gates) and registered.get("model_uri") == model_uri
    if not audited_pass or tags.get("expunge.gates") != "passed":
        return _refuse(settings, ticket_id, decision, reviewer, "not_releasable",
                      f"{model_uri} did not pass its gates according to the audit log (or its tags disagree)")
    if decision == "approve":
        parent, champion = _parent_in_same_model(ref, tags), current_alias(ref.name, CHAMPION)
        # (a version that already serves, released with a batch-mate, is not stale)
        if parent is not None and champion is not None and champion not in (parent, ref):
            return _refuse(settings, ticket_id, decision, reviewer, "stale_base",
                          f"{model_uri} was built on {parent.uri} but the champion is now {champion.uri}; "
                          f"approving it would drop what changed since — re-run the request on the champion")
        # Either record saying a pass is unsettled is enough: an edit can only add caution, never remove it.
        unsettled = unsettled_gates(gates)
        unsettled += [g for g in unsettled_gates(row_gates) if g["gate"] not in {u["gate"] for u in unsettled}]
        if unsettled and not accept_unsettled:
            listed = "; ".join(f"{g['gate']} {g['value']} vs {g['threshold']} (90 % interval "
                               f"{g['interval'][0]:.3f}–{g['interval'][1]:.3f})" for g in unsettled)
            return _refuse(settings, ticket_id, decision, reviewer, "unsettled_gates",
                          f"{model_uri} passed gates whose threshold lies inside their interval, so the pass may be "
                          f"noise: {listed}. Read the evidence report; approve with --accept-unsettled to release anyway")
        return {"model_uri": ref.uri, "unsettled_gates": unsettled, "champion": champion.uri if champion else None}
    return {"model_uri": ref.uri, "unsettled_gates": []}


@task(name="interrupted-release")
def interrupted_release(home: str, profile: str, ticket_id: str) -> dict | None:
    """The release intent a crashed or failed decision left behind: recorded (`release_intent`), perhaps with the
    aliases moved, but with no status change after it. None when every intent has its outcome."""
    settings = settings_for(home, profile)
    with settings.db_session() as session:
        request = requests_repo.get_request(session, ticket_id)
        if request is None or request.status not in ("completed", *CLOSABLE_UNRELEASED):
            return None
        intent = requests_repo.latest_event_with_seq(session, ticket_id, "release_intent")
        changed = requests_repo.latest_event_with_seq(session, ticket_id, "status_changed")
    if intent is None or (changed is not None and changed[0] > intent[0]):
        return None
    return intent[1]


@task(name="batch-mates")
def batch_mates(home: str, profile: str, ticket_id: str, model_uri: str | None) -> list[str]:
    """The other tickets the same version serves (a batch) that wait for this decision (`completed` on it): a
    decision on the version decides them too."""
    if model_uri is None:
        return []
    settings = settings_for(home, profile)
    with settings.db_session() as session:
        return requests_repo.completed_on_model(session, model_uri, leave_out=ticket_id)


@task(name="purge-subject", retries=2, retry_delay_seconds=1)
def purge_subject(home: str, profile: str, ticket_id: str) -> dict:
    """After the decision, the request row no longer names the subject (`intake.purge_subject_row`)."""
    from expunge.intake import purge_subject_row

    settings = settings_for(home, profile)
    with settings.db_session() as session:
        request = requests_repo.get_request(session, ticket_id)
        return {"purged": purge_subject_row(session, request, settings.hmac_key(), "decided")}


@task(name="apply-release")
def apply_release(home: str, profile: str, ticket_id: str, decision: str, model_uri: str | None, reviewer: str,
                  note_hmac: str | None = None) -> dict:
    """Move the aliases and tag the version; the caller records the status change. The reviewer's note is
    free text that may mention the subject, so only its keyed hash (made by the caller) gets this far."""
    settings_for(home, profile)
    if model_uri is None:  # a ticket that ended in review before any version was registered
        return {"decision": decision, "model_uri": None, "reviewer": reviewer, "note_hmac": note_hmac,
                "previous_champion": None, "aliases": []}
    ref = pin(model_uri)
    tags = {f"expunge.release.{k}": v for k, v in (("decision", decision), ("reviewer", reviewer)) if v}
    previous = None
    if decision == "approve":
        previous = promote_to_champion(ref, tags)
    else:
        withdraw_challenger(ref, tags)
    result = {
        "decision": decision, "model_uri": ref.uri, "reviewer": reviewer, "note_hmac": note_hmac,
        "previous_champion": previous.uri if previous else None, "aliases": sorted(aliases_of(ref)),
    }
    get_run_logger().info("ticket %s: %s by reviewer; %s aliases %s", ticket_id, decision, ref.uri, result["aliases"])
    return result


@task(name="review-summary")
def review_summary(home: str, profile: str, ticket_id: str) -> dict:
    """What a reviewer sees in the waiting run's form: status, due date, version, each gate's verdict and the
    tickets decided with it (numbers and ids only, never the subject)."""
    settings = settings_for(home, profile)
    with settings.db_session() as session:
        request = requests_repo.get_request(session, ticket_id)
        if request is None:
            return {"status": "unknown", "markdown": f"no request {ticket_id}"}
        gates = (requests_repo.latest_event(session, ticket_id, "evaluated") or {}).get("gates", [])
        status, model_uri, due = request.status, request.result_model_uri, request.due_at
        mates = requests_repo.completed_on_model(session, model_uri, leave_out=ticket_id) if model_uri else []
    lines = [f"**Ticket {ticket_id}**: {status}, due {due:%Y-%m-%d}; version `{model_uri}`", "",
             "| gate | value | limit | passed |", "|---|---|---|---|"]
    lines += [f"| {g['gate']} | {g['value']} | {g['op']} {g['threshold']} | {'yes' if g['passed'] else 'NO'} |"
              for g in gates]
    if mates:
        lines += ["", f"The version also serves {', '.join(mates)}: this decision is theirs too."]
    lines += ["", f"The evidence report: `expunge report {ticket_id}`."]
    return {"status": status, "markdown": "\n".join(lines)}


@task(name="request-review")
def request_review(home: str, profile: str, ticket_id: str) -> str | None:
    """Start the ticket's waiting review run (the `await-release` deployment, `flows/await_release.py`) and audit its
    id, so `expunge approve` can resume it; None where no such deployment is served (the CLI's local mode)."""
    from prefect.deployments import run_deployment

    settings = settings_for(home, profile)
    try:
        run = run_deployment("await_release/await-release", timeout=0, as_subflow=False,
                             parameters={"ticket_id": ticket_id, "home": home, "profile": profile})
    except Exception as exc:  # noqa: BLE001 - no server or no deployment: the CLI decides, as without one
        get_run_logger().warning("ticket %s: no review run started (%s); decide with expunge approve|reject",
                                 ticket_id, type(exc).__name__)
        return None
    with settings.db_session() as session:
        requests_repo.record_event(session, ticket_id, "review_awaited", {"flow_run_id": str(run.id)})
    return str(run.id)
