"""Settings for a task run, rebuilt from the (home, profile) pair that flows pass around."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from expunge.settings import Settings


def settings_for(home: str, profile: str) -> Settings:
    settings = Settings(home=Path(home), profile_name=profile)
    settings.apply_environment()
    from models_registry.registry import configure

    configure(settings.mlflow_uri, settings.artifact_root)
    return settings


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
