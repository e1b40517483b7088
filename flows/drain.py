"""The scheduled job: process every request that is waiting, the most urgent first, requests on one champion
together (`flows/process_batch.py`) up to the profile's `scheduling.batch_max`."""
from __future__ import annotations

from prefect import flow, get_run_logger

from expunge.settings import Settings
from flows.process_batch import process_batch
from flows.process_request import process_request
from tasks.batch import batch_id_for
from tasks.callbacks import send_status_callbacks
from tasks.lifecycle import runnable_tickets

# A ticket due within this many days is logged as at risk when a drain takes it up.
AT_RISK_DAYS = 7


def plan_runs(tickets: list[dict], batch_max: int) -> list[list[dict]]:
    """Tickets in runs, the run holding the most urgent ticket first: `received` ULD tickets with one batch key
    share a run (at most `batch_max`); a ticket taken up after a lost run, or of a method that edits the weights,
    runs alone."""
    runs: list[list[dict]] = []
    open_batches: dict[str, list[dict]] = {}
    for ticket in tickets:  # earliest due first
        key = ticket.get("batch_key") if ticket.get("status") == "received" and batch_max > 1 else None
        batch = open_batches.get(key) if key else None
        if batch is not None and len(batch) < batch_max:
            batch.append(ticket)
            continue
        runs.append([ticket])
        if key:
            open_batches[key] = runs[-1]
    return runs


def batch_max_of(settings: Settings) -> int:
    """The profile's `scheduling.batch_max`: how many tickets one assistant may forget at once (1: each alone)."""
    value = int((settings.profile.get("scheduling") or {}).get("batch_max", 1))
    if value < 1:
        raise ValueError(f"scheduling.batch_max must be at least 1, got {value}")
    return value


@flow(name="drain_requests", flow_run_name="drain")
def drain_requests(home: str | None = None, profile: str = "demo", await_approval: bool = False) -> dict:
    """Every `received` ticket, and every one whose runner's lease ran out, earliest due date first, then the
    status callbacks they wrote are sent. Tickets on one champion run as a batch (one assistant, a verdict each);
    a ticket that fails its gates in a batch is retried alone, and the rest batched once more without it. Each run
    claims its tickets, so two drains at once never process one twice.
    `home`: default EXPUNGE_HOME (a scheduled run takes the worker's). `await_approval` (on a Prefect server): each
    completed ticket gets a run that waits for its reviewer (`flows/await_release.py`)."""
    settings = Settings.from_env(home, profile)
    home = str(settings.home)
    logger = get_run_logger()
    outcomes: dict[str, str] = {}
    for run in plan_runs(runnable_tickets(home, profile), batch_max_of(settings)):
        for ticket in run:
            if ticket["days_left"] <= AT_RISK_DAYS:
                logger.warning("ticket %s is due in %.1f days (%s)", ticket["ticket_id"], ticket["days_left"],
                               ticket["due_at"][:10])
        if len(run) == 1:
            outcomes.update(_alone(home, profile, run[0]["ticket_id"], run[0]["method"], await_approval))
        else:
            outcomes.update(_batched(home, profile, [t["ticket_id"] for t in run], await_approval))
    logger.info("drained %d ticket(s): %s", len(outcomes), outcomes)
    send_status_callbacks(home, profile)  # the ticketing systems hear of each change (and retries fall due)
    return outcomes


def _alone(home: str, profile: str, ticket_id: str, method: str, await_approval: bool) -> dict[str, str]:
    try:
        return {ticket_id: process_request(ticket_id=ticket_id, home=home, profile=profile, method=method,
                                           await_approval=await_approval)["status"]}
    except Exception as exc:  # recorded as `failed` by the run itself; the drain goes on with the next
        get_run_logger().error("ticket %s: %s", ticket_id, type(exc).__name__)
        return {ticket_id: "failed"}


def _batched(home: str, profile: str, ticket_ids: list[str], await_approval: bool) -> dict[str, str]:
    """One batch; what it split out runs alone, what it returned with them is batched once more (then alone)."""
    outcomes: dict[str, str] = {}
    alone: list[str] = []
    try:
        result = process_batch(ticket_ids=ticket_ids, home=home, profile=profile, batch_id=batch_id_for(ticket_ids),
                               await_approval=await_approval)
    except Exception as exc:  # recorded as `failed` on the tickets it stopped by the run itself
        get_run_logger().error("batch of %d: %s", len(ticket_ids), type(exc).__name__)
        return {ticket_id: "failed" for ticket_id in ticket_ids}
    outcomes.update(result["outcomes"])
    alone += result["split"]
    if len(result["regroup"]) > 1:
        again = process_batch(ticket_ids=result["regroup"], home=home, profile=profile,
                              batch_id=batch_id_for(result["regroup"]), await_approval=await_approval)
        outcomes.update(again["outcomes"])
        alone += again["split"] + again["regroup"]
    else:
        alone += result["regroup"]
    for ticket_id in alone:
        outcomes.update(_alone(home, profile, ticket_id, "uld", await_approval))
    return outcomes
