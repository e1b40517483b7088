"""One compliance request, from `received` to a registered, evaluated, audited model version."""
from __future__ import annotations

from prefect import flow, get_run_logger

from expunge.requests import RequestError
from tasks.data import CorpusDrift, SubjectNotFound, resolve_forget_set
from tasks.evaluate import evaluate_unlearning
from tasks.lifecycle import audit_event, store_outcome, transition
from tasks.register import register_model
from tasks.report import evidence_report
from tasks.unlearn import train_uld_assistant, unlearn_baseline


@flow(name="process_request", flow_run_name="process-{ticket_id}")
def process_request(ticket_id: str, home: str, profile: str = "demo", method: str = "uld") -> dict:
    """`method` is the request's choice (ULD by default; baselines run the same path for comparison)."""
    ctx = (home, profile, ticket_id)
    try:
        transition(*ctx, "resolving")
        resolved = resolve_forget_set(*ctx)
        audit_event(*ctx, "forget_set_resolved", {
            "forget_count": resolved["forget_count"], "retain_count": resolved["retain_count"],
            "neighbour_count": resolved["neighbour_count"], "matched_by": resolved["matched_by"],
            "forget_fingerprint": resolved["forget_fingerprint"],
            "retain_fingerprint": resolved["retain_fingerprint"], "target_uri": resolved["target_uri"],
        })

        transition(*ctx, "training")
        trained = train_uld_assistant(*ctx, resolved) if method == "uld" else unlearn_baseline(*ctx, resolved, method)
        audit_event(*ctx, "unlearning_trained", {
            "method": trained["method"], "config": trained["config"], "report": trained["report"],
            # the served w where it was chosen per erasure, with its candidates' counts and ratios
            **({"weight_selection": trained["weight_selection"]} if "weight_selection" in trained else {}),
        })

        transition(*ctx, "evaluating")
        evaluated = evaluate_unlearning(*ctx, resolved, trained)
        audit_event(*ctx, "evaluated", {"metrics": evaluated["metrics"], "gates": evaluated["gates"]})

        transition(*ctx, "registering")
        registered = register_model(*ctx, resolved, trained, evaluated)
        audit_event(*ctx, "model_registered", {
            "model_uri": registered["model_uri"], "aliases": registered["aliases"],
            "mlflow_run_id": registered["mlflow_run_id"],
        })
    except SubjectNotFound as exc:
        transition(*ctx, "needs_review", reason_code=exc.reason_code, detail=str(exc))
        return {"ticket_id": ticket_id, "status": "needs_review", "reason_code": exc.reason_code}
    except RequestError as exc:
        transition(*ctx, "rejected", reason_code=exc.reason_code, detail=str(exc))
        return {"ticket_id": ticket_id, "status": "rejected", "reason_code": exc.reason_code}
    except CorpusDrift as exc:
        transition(*ctx, "needs_review", reason_code="corpus_drift", detail=str(exc))
        return {"ticket_id": ticket_id, "status": "needs_review", "reason_code": "corpus_drift"}
    except Exception as exc:
        # Unexpected: record it (type only — messages from deep in a library may quote data) and re-raise.
        transition(*ctx, "failed", reason_code="internal_error", detail=type(exc).__name__)
        raise

    store_outcome(*ctx, registered["model_uri"], evaluated["metrics"], evaluated["gates"])
    summary = {
        "ticket_id": ticket_id,
        "model_uri": registered["model_uri"],
        "aliases": registered["aliases"],
        "metrics": evaluated["metrics"],
        "gates": evaluated["gates"],
    }
    if evaluated["passed"]:
        transition(*ctx, "completed", audit_payload={"model_uri": registered["model_uri"]})
        summary["status"] = "completed"
    else:
        failed = [g for g in evaluated["gates"] if not g["passed"]]
        detail = ", ".join(f"{g['gate']} {g['value']} (limit {g['op']} {g['threshold']})" for g in failed)
        transition(*ctx, "failed_gates", reason_code="gate_failed", detail=detail,
                   audit_payload={"model_uri": registered["model_uri"], "failed_gates": failed})
        summary["status"] = "failed_gates"
    # After the final status, so the report shows it and the audit head it quotes covers it.
    report = evidence_report(*ctx, registered["mlflow_run_id"])
    audit_event(*ctx, "evidence_reported", {"report_files": sorted(report)})
    summary["report"] = report["markdown"]
    get_run_logger().info("ticket %s: %s", ticket_id, summary["status"])
    return summary
