"""After the gates: a human reviewer approves a version as `champion`, or declines it; or rolls `champion` back."""
from __future__ import annotations

from prefect import flow

from tasks.lifecycle import audit_event, transition
from tasks.release import apply_release, batch_mates, check_release, interrupted_release, purge_subject
from tasks.rollback import interrupted_rollback, move_champion_back, plan_rollback, reopen_ticket


@flow(name="release_decision", flow_run_name="release-{ticket_id}-{decision}")
def release_decision(ticket_id: str, home: str, profile: str, decision: str, reviewer: str,
                     note_hmac: str | None = None, accept_unsettled: bool = False) -> dict:
    """`decision`: "approve" (→ `released`, version becomes `champion`) or "reject" (→ `release_rejected`).
    `note_hmac`: keyed hash of the reviewer's note (the text itself never becomes a flow parameter).
    `accept_unsettled`: the reviewer approves knowing some gates passed within their interval (else refused).

    The intent is recorded before the aliases move and the status changes after: a decision interrupted in
    between (a DB outage, a crash) is completed by the next decision command on the ticket, as it was decided."""
    ctx = (home, profile, ticket_id)
    pending = interrupted_release(*ctx)
    if pending is not None:
        return _carry_out(ctx, pending)
    checked = check_release(*ctx, decision, reviewer, accept_unsettled)
    if "refused" in checked:
        return {"ticket_id": ticket_id, "status": "refused", **checked["refused"]}
    intent = {"decision": decision, "model_uri": checked["model_uri"], "reviewer": reviewer, "note_hmac": note_hmac,
              "unsettled_gates_accepted": checked["unsettled_gates"], "champion_before": checked.get("champion")}
    audit_event(*ctx, "release_intent", intent)
    return _carry_out(ctx, intent)


def _carry_out(ctx: tuple, intent: dict) -> dict:
    """Move the aliases (idempotent), record the status change, purge the subject."""
    decision = intent["decision"]
    result = apply_release(*ctx, decision, intent["model_uri"], intent["reviewer"], intent["note_hmac"])
    if decision == "approve" and result["previous_champion"] is None:  # the aliases had moved before an interruption
        result["previous_champion"] = intent.get("champion_before")
    audit = {k: result[k] for k in ("model_uri", "reviewer", "note_hmac", "previous_champion", "aliases")}
    if decision == "approve":
        # which gates the reviewer released within noise: names and numbers only, nothing about the subject
        audit["unsettled_gates_accepted"] = intent["unsettled_gates_accepted"]
    _record_decision(ctx, decision, audit)
    decided_with = _decide_batch_mates(ctx, decision, result["model_uri"], audit)
    return {"ticket_id": ctx[2], "status": "released" if decision == "approve" else "release_rejected", **result,
            "unsettled_gates_accepted": intent["unsettled_gates_accepted"], "batch_mates": decided_with}


def _decide_batch_mates(ctx: tuple, decision: str, model_uri: str | None, audit: dict) -> list[str]:
    """A batch version serves several tickets: the decision on it is theirs too, each one audited with the ticket
    it was decided with (a decision interrupted here is finished by a decision on any of them)."""
    home, profile, ticket_id = ctx
    mates = batch_mates(*ctx, model_uri)
    for mate in mates:
        _record_decision((home, profile, mate), decision, {**audit, "decided_with": ticket_id})
    return mates


def _record_decision(ctx: tuple, decision: str, audit: dict) -> None:
    """The ticket's status change for the decision, then its subject purged: the request is decided, so the row no
    longer needs to say who the subject was."""
    if decision == "approve":
        transition(*ctx, "released", audit_payload={"event": "release_approved", **audit})
    else:
        transition(*ctx, "release_rejected", reason_code="reviewer_declined",
                   audit_payload={"event": "release_declined", **audit})
    purge_subject(*ctx)


@flow(name="rollback_champion", flow_run_name="rollback-{model_name}")
def rollback_champion(model_name: str, home: str, profile: str, reviewer: str, reason_hmac: str,
                      to_version: str | None = None) -> dict:
    """Serve an earlier version of `model_name` again and reopen every erasure made after it.

    The intent is audited first, then the alias moves, then each ticket is reopened, then `rolled_back` closes it:
    a rollback interrupted in between is completed by the next rollback command."""
    pending = interrupted_rollback(home, profile)
    if pending is not None:
        done = _roll_back(home, profile, pending)
        return {**done, "status": "completed_interrupted"}
    plan = plan_rollback(home, profile, model_name, to_version)
    if "refused" in plan:
        return {"status": "refused", **plan["refused"]}
    intent = {**plan, "reviewer": reviewer, "reason_hmac": reason_hmac}
    audit_event(home, profile, None, "rollback_intent", intent)
    return {**_roll_back(home, profile, intent), "status": "rolled_back"}


def _roll_back(home: str, profile: str, intent: dict) -> dict:
    move_champion_back(home, profile, intent, intent["reviewer"])
    audit = {"event": "champion_rolled_back", "champion_from": intent["from"], "champion_to": intent["to"],
             "reviewer": intent["reviewer"], "reason_hmac": intent["reason_hmac"]}
    reopened = [t for t in intent["reopen"] if reopen_ticket(home, profile, t, audit)]
    audit_event(home, profile, None, "rolled_back", {**audit, "reopened": intent["reopen"]})
    return {"from": intent["from"], "to": intent["to"], "reopened": intent["reopen"], "reopened_now": reopened}
