"""Where a deployment keeps its state, and the profile (sizes, hyper-parameters) it runs with.

Everything lives under one home directory (`--home` / EXPUNGE_HOME, default ./.expunge): the audit DB,
the MLflow store, Prefect's home, the sample world, trained models and per-ticket work dirs.
"""
from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from expunge_ml.sealed import ASSISTANT_SEAL, derived_key

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_HOME = ".expunge"


class ProfileError(ValueError):
    pass


class ProfileLoader(yaml.SafeLoader):
    """Safe YAML that reads `1e-6` as a number. PyYAML follows YAML 1.1, where a float needs a dot (`1.0e-6`), so
    `relative_top: 1e-6` would be the string "1e-6"."""


ProfileLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),  # exponent, with or without a dot
    list("-+0123456789"),
)


def load_profile(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ProfileError(f"unknown profile {name_or_path!r} (known: {', '.join(known)}, or a YAML path)")
    return yaml.load(path.read_text(), Loader=ProfileLoader)  # noqa: S506 (a SafeLoader subclass)


@dataclass(frozen=True)
class Settings:
    home: Path
    profile_name: str = "demo"

    @classmethod
    def from_env(cls, home: str | Path | None = None, profile: str | None = None) -> "Settings":
        home = Path(home or os.environ.get("EXPUNGE_HOME", DEFAULT_HOME)).expanduser().resolve()
        return cls(home=home, profile_name=profile or os.environ.get("EXPUNGE_PROFILE", "demo"))

    @cached_property
    def profile(self) -> dict[str, Any]:
        return load_profile(self.profile_name)

    @property
    def device(self) -> str:
        """Where models train and run: EXPUNGE_DEVICE, else the profile's runtime.device, else "auto"
        (a CUDA GPU when torch sees one). A GPU worker and a CPU worker can share one profile."""
        return os.environ.get("EXPUNGE_DEVICE") or str(self.profile.get("runtime", {}).get("device", "auto"))

    @property
    def threads(self) -> int | None:
        """CPU threads torch may use: EXPUNGE_THREADS, else the profile's runtime.threads, else None (torch's
        default, one per core). On a machine whose cores another job keeps busy, torch's default thread pool
        spins against it and every step slows down; one thread does not."""
        value = os.environ.get("EXPUNGE_THREADS") or self.profile.get("runtime", {}).get("threads")
        if value in (None, ""):
            return None
        threads = int(value)
        if threads < 1:
            raise ValueError(f"EXPUNGE_THREADS / runtime.threads must be at least 1, got {value!r}")
        return threads

    @property
    def lease_seconds(self) -> float:
        """How long a runner's claim on a ticket lasts without renewal (EXPUNGE_LEASE_SECONDS, default 300): a
        runner renews it every third of that while it works, so a crashed one frees the ticket after this long."""
        value = float(os.environ.get("EXPUNGE_LEASE_SECONDS") or 300)
        if value <= 0:
            raise ValueError(f"EXPUNGE_LEASE_SECONDS must be positive, got {value}")
        return value

    @property
    def retention_days(self) -> float:
        """Days a ticket may rest in a final or review status, or a request file in the inbox's folders, before the
        subject they name is purged: the profile's `privacy.retention_days`, default 30."""
        return float((self.profile.get("privacy") or {}).get("retention_days", 30))

    @property
    def dtype(self) -> str:
        """Precision the target base is loaded in: EXPUNGE_DTYPE, else runtime.dtype, else "float32"."""
        return os.environ.get("EXPUNGE_DTYPE") or str(self.profile.get("runtime", {}).get("dtype", "float32"))

    @property
    def db_url(self) -> str:
        return os.environ.get("EXPUNGE_DB_URL") or f"sqlite:///{self.home / 'audit.db'}"

    @property
    def mlflow_uri(self) -> str:
        return os.environ.get("EXPUNGE_MLFLOW_URI") or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def world_dir(self) -> Path:
        return self.home / "sample_world"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def ticket_dir(self, ticket_id: str) -> Path:
        return self.home / "work" / ticket_id

    def hmac_key(self) -> bytes:
        """Key for hashing identifiers and forget-set text; created once per deployment, never logged."""
        return os.environ.get("EXPUNGE_HMAC_KEY", "").encode() or self._secret_file("secret.key")

    def audit_seal_key(self, create: bool = True) -> bytes | None:
        """Seals every audit event (`db.audit`): derived from the deployment secret, so only this deployment's
        processes can append an event `expunge audit verify` accepts. `create=False`: None where this home has
        no secret (an auditor's machine), instead of making one."""
        if not create and not os.environ.get("EXPUNGE_HMAC_KEY") and not (self.home / "secret.key").exists():
            return None
        return derived_key(self.hmac_key(), "audit seal")

    def adapter_seal_key(self) -> bytes:
        """Encrypts the assistants at rest (`expunge_ml.sealed`): in the work directories and in the registry."""
        return derived_key(self.hmac_key(), ASSISTANT_SEAL)

    def db_session(self):
        """A transactional session on the audit DB (`db.session.session_scope`) that seals what it appends."""
        from db.session import session_scope

        return session_scope(self.db_url, seal_key=self.audit_seal_key())

    def webhook_secret(self) -> bytes:
        """Shared secret that signs intake requests (`expunge serve`) and the callbacks sent back; give it to
        the ticketing system. EXPUNGE_WEBHOOK_SECRET, else `<home>/webhook.key`, created on first use."""
        return os.environ.get("EXPUNGE_WEBHOOK_SECRET", "").encode() or self._secret_file("webhook.key")

    def _secret_file(self, name: str) -> bytes:
        path = self.home / name
        if not path.exists():
            self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:  # created with its final mode, and only once: of two first uses, the second reads the first's key
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(descriptor, "w") as key_file:
                    key_file.write(secrets.token_hex(32))
        key = path.read_text().strip()
        if not key:  # the other first use is still writing it
            raise RuntimeError(f"{path} is empty: another process is creating it; try again")
        return key.encode()

    def apply_environment(self) -> None:
        """Environment for Prefect/MLflow: local, quiet, self-contained. Call before importing prefect.

        Files this process creates are readable by its user only (umask 077): the audit DB, the requests and the
        work directories hold subject data. A corpus downloaded from a hub is cached under the home instead of
        ~/.cache (set before `datasets` is first imported); a local corpus file is read without a lasting cache."""
        os.umask(0o077)
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.environ.setdefault("HF_DATASETS_CACHE", str(self.home / "cache" / "datasets"))
        os.environ["EXPUNGE_HOME"] = str(self.home)
        os.environ["EXPUNGE_PROFILE"] = self.profile_name
        os.environ.setdefault("PREFECT_HOME", str(self.home / "prefect"))
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("DO_NOT_TRACK", "1")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        quiet_libraries()


def quiet_libraries() -> None:
    """Progress bars and advisory warnings from the libraries drown the lifecycle log; keep it readable. Set
    through their environment variables, read when they load: importing them here would cost a command that
    never needs them (`expunge status`) seconds."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its progress bars follow HF_HUB_DISABLE_PROGRESS_BARS
