"""Consolidation: a champion serving stacked assistants distilled into one model, gated, registered; once a
reviewer releases it, it becomes the champion and the assistants it replaces are deleted (`tasks/consolidate.py`)."""
from __future__ import annotations

from prefect import flow, get_run_logger

from expunge.settings import Settings
from tasks.consolidate import (
    check_consolidation_release, delete_assistants, distil_champion, plan_consolidation, promote_consolidation,
    register_consolidation,
)
from tasks.lifecycle import audit_event


@flow(name="consolidate_champion", flow_run_name="consolidate-{model_name}")
def consolidate_champion(model_name: str, home: str | None = None, profile: str = "demo",
                         min_assistants: int = 2) -> dict:
    """Distil the champion of `model_name` when it serves at least `min_assistants` assistants (else skipped); the
    new version is `challenger` when it keeps every erasure of its lineage and what the champion knew.
    `home`: default EXPUNGE_HOME (a scheduled run takes the worker's)."""
    home = str(Settings.from_env(home, profile).home)
    plan = plan_consolidation(home, profile, model_name, min_assistants)
    if "skip" in plan:
        get_run_logger().info("nothing to consolidate: %s", plan["skip"])
        return {"status": "skipped", "reason": plan["skip"]}
    audit_event(home, profile, None, "consolidation_started", {"champion": plan["champion"],
                                                               "assistants": plan["assistants"]})
    distilled = distil_champion(home, profile, plan)
    registered = register_consolidation(home, profile, plan, distilled)
    audit_event(home, profile, None, "consolidation_registered", {
        "model_uri": registered["model_uri"], "champion": plan["champion"], "assistants": plan["assistants"],
        "gates": distilled["gates"], "passed": distilled["passed"], "mlflow_run_id": registered["mlflow_run_id"]})
    return {"status": "completed" if distilled["passed"] else "failed_gates", "champion": plan["champion"],
            "model_uri": registered["model_uri"], "gates": distilled["gates"]}


@flow(name="release_consolidation", flow_run_name="release-consolidation")
def release_consolidation(model_uri: str, home: str, profile: str, reviewer: str) -> dict:
    """A reviewer releases a consolidation: it becomes `champion`, then the assistants it replaces are deleted.
    The intent is audited first: a release interrupted in between is finished by the next one."""
    checked = check_consolidation_release(home, profile, model_uri)
    if "refused" in checked:
        audit_event(home, profile, None, "consolidation_release_refused",
                    {"model_uri": model_uri, "reviewer": reviewer, "reason_code": checked["refused"]["reason_code"]})
        return {"status": "refused", **checked["refused"]}
    intent = {"model_uri": checked["model_uri"], "replaces": checked["champion"], "reviewer": reviewer}
    audit_event(home, profile, None, "consolidation_release_intent", intent)
    promote_consolidation(home, profile, checked["model_uri"], reviewer)
    deleted = delete_assistants(home, profile, checked["model_uri"])
    audit_event(home, profile, None, "consolidation_released", {**intent, "assistants_deleted_from": deleted["versions"],
                                                               "work_adapter_dirs": deleted["work_adapter_dirs"]})
    return {"status": "released", **intent, **deleted}
