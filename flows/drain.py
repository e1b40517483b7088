"""The scheduled job: process every request that is waiting, the most urgent first."""
from __future__ import annotations

from prefect import flow, get_run_logger

from expunge.settings import Settings
from flows.process_request import process_request
from tasks.callbacks import send_status_callbacks
from tasks.lifecycle import runnable_tickets

# A ticket due within this many days is logged as at risk when a drain takes it up.
AT_RISK_DAYS = 7


@flow(name="drain_requests", flow_run_name="drain")
def drain_requests(home: str | None = None, profile: str = "demo") -> dict:
    """Every `received` ticket, and every one whose runner's lease ran out, earliest due date first, each in its
    own `process_request` run, then the status callbacks they wrote are sent. Each run claims its ticket, so two
    drains at once never process one twice.
    `home`: default EXPUNGE_HOME (a scheduled run takes the worker's)."""
    home = str(Settings.from_env(home, profile).home)
    logger = get_run_logger()
    outcomes: dict[str, str] = {}
    for ticket in runnable_tickets(home, profile):
        if ticket["days_left"] <= AT_RISK_DAYS:
            logger.warning("ticket %s is due in %.1f days (%s)", ticket["ticket_id"], ticket["days_left"],
                           ticket["due_at"][:10])
        try:
            result = process_request(ticket_id=ticket["ticket_id"], home=home, profile=profile,
                                     method=ticket["method"])
            outcomes[ticket["ticket_id"]] = result["status"]
        except Exception as exc:  # recorded as `failed` by the run itself; the drain goes on with the next
            logger.error("ticket %s: %s", ticket["ticket_id"], type(exc).__name__)
            outcomes[ticket["ticket_id"]] = "failed"
    logger.info("drained %d ticket(s): %s", len(outcomes), outcomes)
    send_status_callbacks(home, profile)  # the ticketing systems hear of each change (and retries fall due)
    return outcomes
