"""Shared fixtures: a quiet, self-contained Prefect test server and one bootstrapped tiny deployment."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports prefect: keep Prefect's state out of the user's home, quiet and offline.
_PREFECT_HOME = tempfile.mkdtemp(prefix="expunge-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory, prefect_harness) -> Path:
    """A deployment home with the tiny sample world and its base model registered as champion."""
    from expunge.settings import Settings
    from flows.bootstrap import bootstrap_sample_model

    home = tmp_path_factory.mktemp("expunge-home")
    Settings(home=home, profile_name="tiny").apply_environment()
    result = bootstrap_sample_model(home=str(home), profile="tiny")
    assert result["model_uri"].startswith("models:/expunge-sample-llm/")
    return home


@pytest.fixture()
def tiny_settings(tiny_home):
    from expunge.settings import Settings
    from tasks.context import settings_for

    settings_for(str(tiny_home), "tiny")  # points MLflow at this home's store
    return Settings(home=tiny_home, profile_name="tiny")
