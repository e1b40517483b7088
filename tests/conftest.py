"""Shared fixtures (a quiet, self-contained Prefect test server, one bootstrapped tiny deployment, a
throwaway PostgreSQL) and the `pipeline` marker that `make test-fast` leaves out."""
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


@pytest.fixture(scope="session")
def completed(tiny_home):
    """The generated sample request submitted and run once on the tiny deployment; tests inspect the outcome."""
    import yaml
    from typer.testing import CliRunner

    from expunge.cli import app

    def cli(*args: str):
        return CliRunner().invoke(app, ["--home", str(tiny_home), "--profile", "tiny", *args])

    request = tiny_home / "sample_world" / "sample_request.yaml"
    submitted = cli("submit", str(request))
    assert submitted.exit_code == 0, submitted.output
    ran = cli("run", "DEMO-GDPR-0001")
    assert ran.exit_code == 0, ran.output
    return yaml.safe_load(request.read_text())


@pytest.fixture()
def tiny_settings(tiny_home):
    from expunge.settings import Settings
    from tasks.context import settings_for

    settings_for(str(tiny_home), "tiny")  # points MLflow at this home's store
    return Settings(home=tiny_home, profile_name="tiny")


# ------------------------------------------------------------------ the `pipeline` lane

# Fixtures that bootstrap the sample world, run Prefect flows or start a server: a test that uses one
# (directly or through another fixture) exercises the whole pipeline and takes seconds to minutes.
PIPELINE_FIXTURES = frozenset({"tiny_home", "tiny_settings", "prefect_harness", "postgres_url"})
# Fixtures that first train a small model until it memorises its data: tens of seconds of CPU each, which
# would take `make test-fast` over its two minutes.
TRAINED_MODEL_FIXTURES = frozenset({"memorised", "memorised_cpu", "never_saw_pii", "lm_that_rewords"})
# Parametrized fixtures that reach one of those through `request.getfixturevalue` for one value only,
# which collection cannot see: (fixture, value).
PIPELINE_PARAMS = frozenset({("url", "postgresql")})
# Modules that are end-to-end runs as a whole, or whose tests train assistants to convergence.
PIPELINE_MODULES = frozenset({
    "test_pipeline_e2e.py",
    "test_prefect_deployments.py",
    "test_uld.py",
})
# A benchmark's run inside a test: a smoke run on the real data, or a pre-trained model fine-tuned as its base.
BENCHMARK_RUN_WORDS = ("smoke", "pretrained")


def is_pipeline_test(item: pytest.Item) -> bool:
    if item.path.name in PIPELINE_MODULES:
        return True
    if any(word in getattr(item, "originalname", item.name) for word in BENCHMARK_RUN_WORDS):
        return True
    if (PIPELINE_FIXTURES | TRAINED_MODEL_FIXTURES).intersection(getattr(item, "fixturenames", ())):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any((name, value) in PIPELINE_PARAMS for name, value in params.items() if isinstance(value, str))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark full-pipeline tests `pipeline`: `make test-fast` runs `-m "not slow and not pipeline"`."""
    for item in items:
        if is_pipeline_test(item):
            item.add_marker(pytest.mark.pipeline)


# ------------------------------------------------------------------ PostgreSQL for the DB tests

def _pg_bin_dir() -> Path | None:
    """Where initdb/pg_ctl live: PATH first, then Debian's /usr/lib/postgresql/<version>/bin."""
    import shutil

    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    return candidates[0].parent if candidates else None


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """A PostgreSQL URL for the DB tests: EXPUNGE_TEST_POSTGRES_URL if set, else a throwaway cluster
    started here on 127.0.0.1 (initdb runs as the `postgres` user when the tests run as root, because
    PostgreSQL refuses to run as root) and stopped afterwards. Skips when PostgreSQL is not installed,
    except under CI, where a missing server is an install bug (`make test` installs it)."""
    import shutil
    import socket
    import subprocess

    given = os.environ.get("EXPUNGE_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    bin_dir = _pg_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: `make test` should have installed it (apt postgresql)")
        pytest.skip("PostgreSQL not installed (apt install postgresql, or set EXPUNGE_TEST_POSTGRES_URL)")
    root = Path(tempfile.mkdtemp(prefix="expunge-pg-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    run_as: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser") or shutil.which("su")
        if runuser is None:
            pytest.skip("running as root without runuser/su: cannot start PostgreSQL as a normal user")
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
        run_as = [runuser, "-u", "postgres", "--"] if runuser.endswith("runuser") else []
    with socket.socket() as s:  # a free port on the loopback interface
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def pg(*args: str) -> None:
        subprocess.run([*run_as, *args], check=True, capture_output=True, text=True, timeout=120)

    try:
        pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
           f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off", "start")
    except subprocess.CalledProcessError as exc:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        pytest.fail(f"could not start PostgreSQL: {exc.stderr or exc.stdout} {log[-2000:]}")
    try:
        from sqlalchemy import create_engine, text

        admin = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("CREATE DATABASE expunge_test"))
        admin.dispose()
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/expunge_test"
    finally:
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
