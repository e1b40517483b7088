"""Status callbacks, sent from a flow: the scheduled drain reports what it changed without a CLI or `serve`."""
from __future__ import annotations

from prefect import get_run_logger, task

from tasks.context import settings_for


@task(name="send-status-callbacks")
def send_status_callbacks(home: str, profile: str) -> dict[str, int]:
    """Deliver every status callback that is due (`expunge.callbacks.deliver_due`): counts only, no URLs."""
    from expunge.callbacks import deliver_due

    counts = deliver_due(settings_for(home, profile))
    if any(counts.values()):
        get_run_logger().info("status callbacks: %s", counts)
    return counts
