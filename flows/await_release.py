"""A completed ticket waiting for its reviewer inside Prefect: the run suspends with a form (approve or reject,
who) that shows the evidence summary, and is resumed from the Prefect UI or by `expunge approve|reject`.

Started by `process_request` / `process_batch` when run with `await_approval` on a server (the `await-release`
deployment); the decision itself is `release_decision`, the same flow the CLI runs, so a decision made in either
place is made once and the other finds it made.
"""
from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from prefect.flow_runs import suspend_flow_run
from prefect.input import RunInput

from flows.release import release_decision
from tasks.release import review_summary

DECIDED = ("released", "release_rejected")


class ReleaseInput(RunInput):
    """The reviewer's form. No free-text note: a run input is stored in Prefect in clear, and a note may name the
    subject (`expunge approve --note` records only its keyed hash)."""

    decision: Literal["approve", "reject"]
    reviewer: str
    accept_unsettled: bool = False


@flow(name="await_release", flow_run_name="review-{ticket_id}")
def await_release(ticket_id: str, home: str, profile: str = "demo") -> dict:
    """Suspend until a reviewer decides, then carry the decision out (`release_decision`). Prefect runs a resumed
    flow again from the top: everything before the suspension only reads, and the suspension returns the form."""
    summary = review_summary(home, profile, ticket_id)
    if summary["status"] != "completed":
        return {"ticket_id": ticket_id, "status": summary["status"], "decided": summary["status"] in DECIDED}
    form = suspend_flow_run(
        wait_for_input=ReleaseInput.with_initial_data(description=summary["markdown"], decision="approve",
                                                      reviewer=""),
        key="release-decision")  # one suspension per run (Prefect allows lowercase, digits and dashes)
    decided = review_summary(home, profile, ticket_id)["status"]
    if decided != "completed":  # decided meanwhile (`expunge approve` resumes this run after deciding)
        get_run_logger().info("ticket %s was decided meanwhile: %s", ticket_id, decided)
        return {"ticket_id": ticket_id, "status": decided, "decided": decided in DECIDED}
    return release_decision(ticket_id=ticket_id, home=home, profile=profile, decision=form.decision,
                            reviewer=form.reviewer, accept_unsettled=form.accept_unsettled)
