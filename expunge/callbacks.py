"""Delivering the status callbacks a request asked for (`callback_url`).

Each status change writes its callback row in the same transaction (`db.requests_repo.enqueue_callback`), so a
change is never lost when the receiver or this process is down. Here they are sent, signed with the webhook
secret, oldest first and in order per ticket; a failed attempt is retried with exponential backoff, and every
attempt is audited (outcome, HTTP status, attempt number: never the URL in clear, only its keyed hash).
"""
from __future__ import annotations

import hmac
from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from db import requests_repo
from db.models import CallbackDelivery, Request
from expunge.settings import Settings
from expunge.webhooks import signed_headers

MAX_ATTEMPTS = 8
FIRST_RETRY_SECONDS = 30.0  # then 60, 120, … capped at MAX_RETRY_SECONDS
MAX_RETRY_SECONDS = 3600.0
TIMEOUT_SECONDS = 10.0


def retry_delay(attempts: int) -> timedelta:
    return timedelta(seconds=min(FIRST_RETRY_SECONDS * 2 ** (attempts - 1), MAX_RETRY_SECONDS))


def _post(client, url: str, body: bytes, secret: bytes) -> tuple[int | None, str | None]:
    """(HTTP status, error class): one signed POST."""
    import httpx

    headers = {"Content-Type": "application/json", **signed_headers(secret, body)}
    try:
        response = client.post(url, content=body, headers=headers, timeout=TIMEOUT_SECONDS)
    except httpx.HTTPError as exc:
        return None, type(exc).__name__
    return response.status_code, None if response.is_success else f"HTTP {response.status_code}"


def deliver_due(settings: Settings, now: datetime | None = None, client=None) -> dict[str, int]:
    """Send every callback that is due; returns counts of delivered, failed (to retry) and given up."""
    now = now or datetime.now(timezone.utc)
    counts = {"delivered": 0, "failed": 0, "given_up": 0}
    with settings.db_session() as session:
        pending = session.scalars(select(CallbackDelivery).where(
            CallbackDelivery.delivered_at.is_(None), CallbackDelivery.given_up_at.is_(None),
        ).order_by(CallbackDelivery.id)).all()
        if not pending:  # every `expunge run` asks: no secret file created, no HTTP client, when nothing waits
            return counts
        import httpx

        secret = settings.webhook_secret()
        own_client = client is None
        client = client or httpx.Client()
        try:
            blocked: set[str] = set()  # a ticket's later changes wait for its earlier ones: receivers see them in order
            for delivery in pending:
                if delivery.ticket_id in blocked or delivery.next_attempt_at > now:
                    blocked.add(delivery.ticket_id)
                    continue
                outcome = _attempt(session, settings, client, secret, delivery, now)
                counts[outcome] += 1
                if outcome != "delivered":
                    blocked.add(delivery.ticket_id)
        finally:
            if own_client:
                client.close()
    return counts


def _attempt(session, settings: Settings, client, secret: bytes, delivery: CallbackDelivery, now: datetime) -> str:
    request = session.scalar(select(Request).where(Request.ticket_id == delivery.ticket_id))
    url = request.callback_url if request is not None else None
    delivery.attempts += 1
    if url is None:
        status, error = None, "no_callback_url"
    else:
        status, error = _post(client, url, delivery.payload_json.encode(), secret)
    if error is None:
        delivery.delivered_at, outcome = now, "delivered"
    elif delivery.attempts >= MAX_ATTEMPTS or url is None:
        delivery.given_up_at, outcome = now, "given_up"
    else:
        delivery.next_attempt_at, outcome = now + retry_delay(delivery.attempts), "failed"
    delivery.last_error = error[:200] if error else None
    url_hmac = hmac.new(settings.hmac_key(), (url or "").encode(), "sha256").hexdigest()
    requests_repo.record_event(session, delivery.ticket_id, "callback_attempt", {
        "delivery_id": delivery.id, "attempt": delivery.attempts, "outcome": outcome, "http_status": status,
        "error": error, "url_hmac": url_hmac,
        **({"next_attempt_at": delivery.next_attempt_at.isoformat()} if outcome == "failed" else {}),
    })
    session.commit()  # each attempt stands on its own: a later crash does not resend what was delivered
    return outcome
