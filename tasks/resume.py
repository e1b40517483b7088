"""A ticket taken up after its runner was lost (`lease_expired`) keeps the training that runner finished: the
assistants or edited model in the work directory are reused when they were trained from exactly the same
inputs, and are intact. Training is most of a request's time; evaluation and registration run again."""
from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from prefect import get_run_logger, task

from tasks.context import read_json, settings_for
from tasks.contracts import ResolvedRequest, TrainedUnlearning

# Steps a lost run can only have reached once its training was written in full.
AFTER_TRAINING = ("evaluating", "registering")


def training_inputs_fingerprint(settings, ticket_id: str | list[str], resolved: ResolvedRequest, method: str) -> str:
    """Keyed hash of everything a training depends on: the request (a batch's: each of its tickets'), the resolved
    data, the target's weights and earlier assistants, the profile's unlearning settings and the method."""
    from db import requests_repo

    target = read_json(resolved.target_path)
    tickets = [ticket_id] if isinstance(ticket_id, str) else list(ticket_id)
    with settings.db_session() as session:  # the request as filed (its keyed hash: a decision purges the row's text)
        request_hashes = [requests_repo.get_request(session, t).spec_hash for t in tickets]
    inputs = {
        "method": method,
        "request": request_hashes[0] if isinstance(ticket_id, str) else request_hashes,
        "forget": resolved.forget_fingerprint, "retain": resolved.retain_fingerprint,
        "target": [target.get("pinned_uri") or target.get("requested_uri"), target.get("base_weights_sha256"),
                   len(target.get("prior_assistants") or [])],
        "unlearning": settings.profile["unlearning"], "runtime": settings.profile.get("runtime"),
    }
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hmac.new(settings.hmac_key(), canonical.encode(), hashlib.sha256).hexdigest()


def _intact(settings, trained: TrainedUnlearning) -> bool:
    from expunge_ml.modeling import weights_fingerprint
    from expunge_ml.sealed import SealedAdapterError, open_sealed

    if trained.model_dir:
        return Path(trained.model_dir).is_dir() and weights_fingerprint(Path(trained.model_dir)) == trained.weights_sha256
    try:
        for adapter_dir in trained.adapter_dirs:
            open_sealed(adapter_dir, settings.adapter_seal_key())  # the authentication tag fails on a torn file
    except (OSError, SealedAdapterError):
        return False
    return bool(trained.adapter_dirs)


@task(name="reuse-finished-training")
def reusable_training(home: str, profile: str, ticket_id: str, resolved: ResolvedRequest,
                      method: str) -> TrainedUnlearning | None:
    """The lost run's training, when it was trained from these very inputs and its files are intact; else None."""
    settings = settings_for(home, profile)
    path = settings.ticket_dir(ticket_id) / "training.json"
    if not path.exists():
        return None
    trained = TrainedUnlearning.from_json(read_json(path))
    expected = training_inputs_fingerprint(settings, ticket_id, resolved, method)
    if trained.inputs_fingerprint != expected or not _intact(settings, trained):
        get_run_logger().info("ticket %s: the lost run's training does not match this run's inputs; training again",
                              ticket_id)
        return None
    return trained
