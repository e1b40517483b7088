"""Settings for a task run, rebuilt from the (home, profile) pair that flows pass around."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from expunge.settings import Settings


def settings_for(home: str, profile: str) -> Settings:
    settings = Settings(home=Path(home), profile_name=profile)
    settings.apply_environment()
    if settings.threads:  # a worker's process: every task sets it, so it holds whichever task runs first
        import torch

        torch.set_num_threads(settings.threads)
    from models_registry.registry import configure

    configure(settings.mlflow_uri, settings.artifact_root, settings.adapter_seal_key())
    return settings


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def request_spec(settings: Settings, ticket_id: str):
    """The ticket's validated request (with its subject: keep it in memory, never in a result or log)."""
    from db import requests_repo
    from expunge.requests import RequestSpec

    with settings.db_session() as session:
        return RequestSpec.model_validate_json(requests_repo.get_request(session, ticket_id).spec_json)
