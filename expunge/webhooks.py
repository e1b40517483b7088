"""Signed HTTP messages, both ways: a ticketing system's requests to `expunge serve`, and the status callbacks
expunge sends back. The scheme is the one ticketing and privacy platforms sign webhooks with: HMAC-SHA256 of
`<timestamp>.<body>` under a shared secret, in two headers, accepted within a tolerance window."""
from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Expunge-Signature"
TIMESTAMP_HEADER = "X-Expunge-Timestamp"
TOLERANCE_SECONDS = 300  # a signed message older (or further in the future) than this is refused


class SignatureError(ValueError):
    """A message whose signature is missing, wrong or stale; `reason_code` says which."""

    def __init__(self, reason_code: str, message: str):
        super().__init__(message)
        self.reason_code = reason_code


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def signed_headers(secret: bytes, body: bytes, now: float | None = None) -> dict[str, str]:
    """Headers that sign `body` now: what a sender adds (the callbacks, the tests, a ticketing system)."""
    timestamp = str(int(time.time() if now is None else now))
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature(secret, timestamp, body)}


def verify(secret: bytes, headers, body: bytes, now: float | None = None,
           tolerance: float = TOLERANCE_SECONDS) -> str:
    """Check a message's signature and freshness; returns the signature (the replay guard's key) or raises."""
    timestamp, given = headers.get(TIMESTAMP_HEADER), headers.get(SIGNATURE_HEADER)
    if not timestamp or not given:
        raise SignatureError("unsigned", f"{TIMESTAMP_HEADER} and {SIGNATURE_HEADER} headers are required")
    if not timestamp.isdigit() or len(timestamp) > 12:
        raise SignatureError("bad_timestamp", f"{TIMESTAMP_HEADER} must be Unix seconds")
    if not hmac.compare_digest(given, signature(secret, timestamp, body)):
        raise SignatureError("bad_signature", "the signature does not match the body and timestamp")
    age = (time.time() if now is None else now) - int(timestamp)
    if abs(age) > tolerance:
        raise SignatureError("stale_timestamp", f"the message is {age:.0f}s old; at most {tolerance:.0f}s is accepted")
    return given
