"""One compliance request, from `received` to a registered, evaluated, audited model version."""
from __future__ import annotations

from prefect import flow, get_run_logger

from expunge.requests import RequestError
from tasks.contracts import Evaluation, Registration
from tasks.data import CorpusDrift, SubjectNotFound, resolve_forget_set
from tasks.evaluate import evaluate_unlearning, measure_prior_knowledge
from tasks.lifecycle import (LeaseLost, audit_event, claim_ticket, end_lease_now, lease_kept, new_runner_id,
                             store_outcome, transition)
from tasks.register import mark_orphans, register_model
from tasks.release import request_review
from tasks.report import evidence_report
from tasks.resume import AFTER_TRAINING, reusable_training
from tasks.unlearn import unlearning_task


def nothing_to_forget(known: dict) -> str:
    return (f"before unlearning, the target's {known['metric']} on the forget questions is {known['forget']}, "
            f"{known['margin']} above its level on people it never saw (at least {known['min_margin']} expected): "
            "little or nothing to forget")


def _gated_status(move, evaluated: Evaluation, registered: Registration, batch_id: str | None = None) -> str:
    """completed when every gate passed, else failed_gates with the failing gates named (numbers only)."""
    if evaluated.passed:
        move("completed", audit_payload={"model_uri": registered.model_uri,
                                         **({"batch_id": batch_id} if batch_id else {})})
        return "completed"
    failed = evaluated.failed_gates()
    detail = ", ".join(f"{g['gate']} {g['value']} (limit {g['op']} {g['threshold']})" for g in failed)
    move("failed_gates", reason_code="gate_failed", detail=detail,
         audit_payload={"model_uri": registered.model_uri, "failed_gates": failed})
    return "failed_gates"


@flow(name="process_request", flow_run_name="process-{ticket_id}", on_crashed=[end_lease_now],
      on_cancellation=[end_lease_now])
def process_request(ticket_id: str, home: str, profile: str = "demo", method: str = "uld",
                    await_approval: bool = False) -> dict:
    """`method` is the request's choice (ULD by default; baselines run the same path for comparison). The run
    claims the ticket first and holds a lease while it works: a second runner skips it, and a ticket whose
    runner crashed is taken up again once its lease runs out. `await_approval` (on a Prefect server): a completed
    ticket gets a review run that waits for its reviewer (`flows/await_release.py`)."""
    ctx = (home, profile, ticket_id)
    runner = new_runner_id()
    claimed = claim_ticket(*ctx, runner)
    if claimed is None:
        get_run_logger().info("ticket %s: held by another runner, or not runnable; skipped", ticket_id)
        return {"ticket_id": ticket_id, "status": "skipped", "reason_code": "not_claimed"}
    if claimed["interrupted_step"] == "registering":  # the lost run may have registered a version already
        orphans = mark_orphans(*ctx)
        audit_event(*ctx, "orphaned_versions_marked", {"model_uris": orphans})
    with lease_kept(*ctx, runner):
        return _process(ctx, runner, method, claimed["interrupted_step"] in AFTER_TRAINING, await_approval)


def _train(ctx: tuple, resolved, method: str, after_lost_training: bool):
    """This request's unlearning: the lost run's, where it finished training from the same inputs, else new."""
    reused = reusable_training(*ctx, resolved, method) if after_lost_training else None
    if reused is not None:
        audit_event(*ctx, "training_reused", {"inputs_fingerprint": reused.inputs_fingerprint})
        return reused
    trained = unlearning_task(method)(*ctx, resolved, method)
    audit_event(*ctx, "unlearning_trained", trained.audit_payload())
    return trained


def resolve_and_measure(ctx: tuple, move):
    """`resolving`: the forget and retain sets, then what the target knows of the forget set before any training."""
    move("resolving")
    resolved = resolve_forget_set(*ctx)
    audit_event(*ctx, "forget_set_resolved", resolved.audit_payload())
    known = measure_prior_knowledge(*ctx, resolved)
    audit_event(*ctx, "prior_knowledge_measured", known)
    return resolved, known


def needs_review_first(known: dict) -> bool:
    """The profile asks a person to look before training on a subject the target barely knows."""
    return known["known"] is False and known["action"] == "review"


def settled_by_error(ticket_id: str, exc: Exception, move) -> dict | None:
    """The status an expected failure settles a ticket in (subject not found, a bad request, corpus drift), or
    None for an exception that is not one of them."""
    if isinstance(exc, SubjectNotFound):
        status, reason = "needs_review", exc.reason_code
    elif isinstance(exc, RequestError):
        status, reason = "rejected", exc.reason_code
    elif isinstance(exc, CorpusDrift):
        status, reason = "needs_review", "corpus_drift"
    else:
        return None
    move(status, reason_code=reason, detail=str(exc))
    return {"ticket_id": ticket_id, "status": status, "reason_code": reason}


def _process(ctx: tuple, runner: str, method: str, after_lost_training: bool = False,
             await_approval: bool = False) -> dict:
    ticket_id = ctx[2]

    def move(status: str, **details) -> str:  # every change under this run's claim
        return transition(*ctx, status, runner=runner, **details)

    try:
        resolved, known = resolve_and_measure(ctx, move)
        if needs_review_first(known):
            move("needs_review", reason_code="nothing_to_forget", detail=nothing_to_forget(known))
            return {"ticket_id": ticket_id, "status": "needs_review", "reason_code": "nothing_to_forget"}

        move("training")
        trained = _train(ctx, resolved, method, after_lost_training)
        if not trained.converged:  # a score of 0 from an assistant that learned nothing would look like erasure
            move("needs_review", reason_code="assistant_not_converged", detail=trained.convergence_detail())
            return {"ticket_id": ticket_id, "status": "needs_review", "reason_code": "assistant_not_converged"}

        move("evaluating")
        evaluated = evaluate_unlearning(*ctx, resolved, trained)
        audit_event(*ctx, "evaluated", {"metrics": evaluated.metrics, "gates": list(evaluated.gates)})

        move("registering")
        registered = register_model(*ctx, resolved, trained, evaluated)
        audit_event(*ctx, "model_registered", {
            "model_uri": registered.model_uri, "aliases": list(registered.aliases),
            "mlflow_run_id": registered.mlflow_run_id,
        })
    except LeaseLost:  # another run has the ticket now: it records what happens next
        raise
    except Exception as exc:
        settled = settled_by_error(ticket_id, exc, move)
        if settled is not None:
            return settled
        # Unexpected: record it (type only — messages from deep in a library may quote data) and re-raise.
        move("failed", reason_code="internal_error", detail=type(exc).__name__)
        raise

    return finish(ctx, move, registered, evaluated, await_approval=await_approval) | {
        "warnings": ([f"nothing_to_forget: {nothing_to_forget(known)}"] if known["known"] is False else [])
        + trained.warnings(),
    }


def finish(ctx: tuple, move, registered: Registration, evaluated: Evaluation, report_path: str = "evidence_report",
           batch_id: str | None = None, await_approval: bool = False) -> dict:
    """The ticket's outcome on its row, its final status, then its evidence report (after the status, so the report
    shows it and the audit head it quotes covers it), then, if asked, the run that waits for its reviewer."""
    ticket_id = ctx[2]
    store_outcome(*ctx, registered.model_uri, evaluated.metrics, list(evaluated.gates))
    status = _gated_status(move, evaluated, registered, batch_id)
    report = evidence_report(*ctx, registered.mlflow_run_id, report_path)
    audit_event(*ctx, "evidence_reported", {"report_files": sorted(report)})
    get_run_logger().info("ticket %s: %s", ticket_id, status)
    if await_approval and status == "completed":
        request_review(*ctx)
    return {
        "ticket_id": ticket_id, "status": status, "model_uri": registered.model_uri,
        "aliases": list(registered.aliases), "metrics": evaluated.metrics, "gates": list(evaluated.gates),
        "report": report["markdown"],
    }
