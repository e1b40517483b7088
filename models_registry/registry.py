"""Everything that talks to MLflow: tracking setup, registering versions, aliases, resolving URIs.

Model kinds, recorded as the version tag `expunge.kind`:
- `causal_lm`: a plain HF causal LM bundled as an artifact (e.g. the embedded sample base model);
- `uld_composite`: ULD adapters + config that *reference* a pinned base version by URI and hash.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from models_registry.predict_io import DEFAULT_MAX_NEW_TOKENS, serving_signature

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent
EXPERIMENT = "expunge"
KIND_TAG = "expunge.kind"
WEIGHTS_TAG = "expunge.weights_sha256"
CORPUS_TAG = "expunge.corpus"
PROMPT_TAG = "expunge.prompt_template"
PIP_REQUIREMENTS = [
    "torch>=2.4", "transformers>=4.46", "peft>=0.13", "safetensors", "rouge-score", "scipy", "pandas",
]
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class ModelNotFound(LookupError):
    """A model URI that names nothing the registry (or the file system) knows."""


_adapter_key: bytes | None = None


def configure(tracking_uri: str, artifact_root: Path, adapter_key: bytes | None = None) -> None:
    """Point MLflow at this deployment's store; the experiment keeps artifacts under `artifact_root`.
    `adapter_key` opens the sealed assistants of the versions this process loads (`expunge_ml.sealed`)."""
    global _adapter_key
    if adapter_key is not None:
        _adapter_key = adapter_key
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        artifact_root.mkdir(parents=True, exist_ok=True)
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_root.resolve().as_uri())
    mlflow.set_experiment(EXPERIMENT)


def adapter_key() -> bytes | None:
    """The key that opens sealed assistants here: the deployment's (`configure`), else derived from
    EXPUNGE_HMAC_KEY for a process serving a version outside expunge (`mlflow models serve`)."""
    if _adapter_key is not None:
        return _adapter_key
    from expunge_ml.sealed import ASSISTANT_SEAL, derived_key

    secret = os.environ.get("EXPUNGE_HMAC_KEY", "").encode()
    return derived_key(secret, ASSISTANT_SEAL) if secret else None


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    match = _URI.match(uri)
    if not match:
        raise ModelNotFound(f"not a registry URI (expected models:/name@alias or models:/name/N): {uri}")
    return match["name"], match["alias"], match["version"]


def pin(uri: str) -> ModelRef:
    """Resolve an alias URI to the exact version it points at now."""
    name, alias, version = parse_model_uri(uri)
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelNotFound(f"no registered model version for {uri}") from exc
    return ModelRef(name, str(mv.version))


def version_tags(ref: ModelRef) -> dict[str, str]:
    return dict(MlflowClient().get_model_version(ref.name, ref.version).tags)


def _pyfunc_spec(local_dir: Path) -> dict[str, Any]:
    from mlflow.models import Model

    return Model.load(str(local_dir / "MLmodel")).flavors["python_function"]


def model_config_of(pyfunc_spec: dict[str, Any]) -> dict[str, Any]:
    """The `model_config` a pyfunc was logged with (MLflow stores it under `config`)."""
    return pyfunc_spec.get("config") or pyfunc_spec.get("model_config") or {}


def _download(ref: ModelRef) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri))


def _pyfunc_spec_only(ref: ModelRef) -> dict[str, Any]:
    """A version's pyfunc spec from its MLmodel file alone, without fetching its weights or adapters."""
    return _pyfunc_spec(Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{ref.uri}/MLmodel")).parent)


def local_model_dir(uri: str) -> str:
    """Where to load a `causal_lm` version from: a downloaded artifact dir (or the path / hub id as given)."""
    if not uri.startswith("models:/"):
        return uri
    ref = pin(uri)
    local = _download(ref)
    artifacts = _pyfunc_spec(local).get("artifacts", {})
    if "hf_model" not in artifacts:
        raise ModelNotFound(f"{uri} is not a plain causal LM version")
    return str(local / artifacts["hf_model"]["path"])


@dataclass
class ResolvedTarget:
    """What the pipeline needs to unlearn a target model, whatever kind it is."""

    requested_uri: str
    pinned_uri: str | None  # models:/name/N, or None for a local dir / hub id
    registered_name: str | None
    kind: str
    base_location: str  # local HF dir or hub id of the underlying base model
    base_uri: str  # how versions refer to that base (pinned registry URI or the location)
    base_weights_sha256: str | None
    corpus: dict[str, Any] | None
    prompt_template: str | None
    prior_assistants: list[dict[str, Any]] = field(default_factory=list)  # [{dir, weight}]: the assistants served
    relative_top: float = 0.0
    # What this version's lineage erased (`expunge_ml.corpus.erased_lineage`: keyed hashes only), or None
    erased: dict[str, Any] | None = None


def own_chat_template(location: str) -> str | None:
    """The prompt frame of a model outside the registry: its tokenizer's chat template when it has one (an
    instruction-tuned model answers in it), else None (the raw question/answer frame)."""
    from transformers import AutoTokenizer

    from expunge_ml.prompting import chat_format

    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as exc:  # no tokenizer files, or a hub id without network
        raise ModelNotFound(f"cannot load the tokenizer of {location}: {type(exc).__name__}") from None
    fmt = chat_format(tokenizer)
    return fmt.template if fmt else None


def resolve_target(uri: str) -> ResolvedTarget:
    """Resolve `models:/…`, a local model directory, or a hub id (only where the user has network)."""
    if not uri.startswith("models:/"):
        path = Path(uri).expanduser()
        if path.is_dir():
            if not (path / "config.json").exists():
                raise ModelNotFound(f"{uri} is a directory without a Hugging Face config.json")
            from expunge_ml.modeling import weights_fingerprint

            location = str(path.resolve())
            return ResolvedTarget(uri, None, None, "causal_lm", location, location,
                                  weights_fingerprint(path), None, own_chat_template(location))
        if re.fullmatch(r"[\w.-]+/[\w.-]+", uri) and not path.exists():
            return ResolvedTarget(uri, None, None, "causal_lm", uri, uri, None, None, own_chat_template(uri))
        raise ModelNotFound(f"unknown model {uri!r}: not a registry URI, a model directory or a hub id")
    ref = pin(uri)
    tags = version_tags(ref)
    kind = tags.get(KIND_TAG, "causal_lm")
    corpus = json.loads(tags[CORPUS_TAG]) if CORPUS_TAG in tags else None
    local = _download(ref)
    spec = _pyfunc_spec(local)
    erased = _erased_records(local, spec)
    if kind == "causal_lm":
        base_dir = local / spec["artifacts"]["hf_model"]["path"]
        return ResolvedTarget(uri, ref.uri, ref.name, kind, str(base_dir), ref.uri,
                              tags.get(WEIGHTS_TAG), corpus, tags.get(PROMPT_TAG), erased=erased)
    if kind == "uld_composite":
        config = model_config_of(spec)
        base_dir = local_model_dir(config["base_uri"])
        prior = [
            {"dir": str(local / spec["artifacts"][a["artifact"]]["path"]), "weight": a.get("weight")}
            for a in config["assistants"]
        ]
        return ResolvedTarget(uri, ref.uri, ref.name, kind, str(base_dir), config["base_uri"],
                              config["base_weights_sha256"], corpus, config.get("prompt_template"),
                              prior, float(config.get("relative_top", 0.0)), erased)
    raise ModelNotFound(f"{uri} has unsupported kind {kind!r}")


ERASED_ARTIFACT = "erased_records"


def _erased_records(local: Path, spec: dict) -> dict[str, Any] | None:
    """The erased-records file a version carries (an unlearned one), or None (a base)."""
    entry = spec.get("artifacts", {}).get(ERASED_ARTIFACT)
    return json.loads((local / entry["path"]).read_text()) if entry else None


def _log_pyfunc(code_file: str, artifacts: dict[str, str], model_config: dict, name: str) -> Any:
    """Log from code (no pickled model object) into the caller's active run, registering a version."""
    if mlflow.active_run() is None:
        raise RuntimeError("register_* must be called inside an active MLflow run")
    import warnings

    with warnings.catch_warnings():
        # An input example would make MLflow load the model to run it at logging time; the signature says what
        # it takes, and registration asks the loaded version a question anyway (tasks/register.py).
        warnings.filterwarnings("ignore", message=".*input example was not provided.*", category=UserWarning)
        return _log_model(code_file, artifacts, model_config, name)


def _log_model(code_file: str, artifacts: dict[str, str], model_config: dict, name: str) -> Any:
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PACKAGE_DIR / code_file),
        artifacts=artifacts,
        model_config=model_config,
        code_paths=[str(PROJECT_DIR / "expunge_ml"), str(PACKAGE_DIR)],
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=name,
        signature=serving_signature(int(model_config.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))),
    )


def _registered_version(info: Any, name: str) -> ModelRef:
    version = getattr(info, "registered_model_version", None)
    if version is None:  # older MLflow: look the newest version up
        version = max(int(v.version) for v in MlflowClient().search_model_versions(f"name='{name}'"))
    return ModelRef(name, str(version))


def register_causal_lm(
    model_dir: Path,
    name: str,
    weights_sha256: str,
    corpus: dict[str, Any] | None,
    prompt_template: str,
    tags: dict[str, str],
    alias: str | None = None,
    erased_records: Path | None = None,
) -> ModelRef:
    """Register a plain HF causal LM (the embedded base, a user's own, or a baseline's edit of one) as a new
    version; `erased_records` is the file of what its lineage erased (`expunge_ml.corpus.erased_lineage`)."""
    config = {"prompt_template": prompt_template}
    artifacts = {"hf_model": str(model_dir)}
    if erased_records is not None:
        artifacts[ERASED_ARTIFACT] = str(erased_records)
    info = _log_pyfunc("pyfunc_causal_lm.py", artifacts, config, name)
    ref = _registered_version(info, name)
    all_tags = {KIND_TAG: "causal_lm", WEIGHTS_TAG: weights_sha256, PROMPT_TAG: prompt_template, **tags}
    if corpus is not None:
        all_tags[CORPUS_TAG] = json.dumps(corpus, sort_keys=True)
    _tag_and_alias(ref, all_tags, alias)
    return ref


def register_uld_composite(
    name: str,
    target: ResolvedTarget,
    new_assistants: list[dict],
    relative_top: float,
    tags: dict[str, str],
    alias: str | None = "challenger",
    erased_records: Path | None = None,
    *,
    seal_key: bytes,
) -> ModelRef:
    """A new version = earlier assistants of the target (if it was a composite) + this erasure's
    (`new_assistants`: {"dir": adapter directory, "weight": its w}, one per assistant of an ensemble);
    `erased_records` is the file of what its lineage erased (`expunge_ml.corpus.erased_lineage`). The version
    carries every assistant sealed: an adapter stored in clear (a version registered before sealing) is sealed
    with `seal_key` on the way."""
    import shutil
    import tempfile

    from expunge_ml.sealed import is_sealed, seal_directory

    staging = Path(tempfile.mkdtemp(prefix="expunge-adapters-"))
    artifacts, assistants = {}, []
    if not new_assistants:
        raise ValueError("a ULD version needs at least one new assistant")
    for index, prior in enumerate(target.prior_assistants + list(new_assistants)):
        key = f"assistant_{index}"
        # MLflow stores an artifact directory under its base name: give each adapter a unique one.
        artifacts[key] = str(shutil.copytree(prior["dir"], staging / key) if is_sealed(prior["dir"])
                             else seal_directory(prior["dir"], staging / key, seal_key).parent)
        weight = prior.get("weight")  # None: served at the w saved with the adapter (`expunge_ml.serving`)
        assistants.append({"artifact": key, "weight": None if weight is None else float(weight)})
    if erased_records is not None:
        artifacts[ERASED_ARTIFACT] = str(erased_records)
    config = {
        "base_uri": target.base_uri,
        "base_weights_sha256": target.base_weights_sha256,
        "assistants": assistants,
        "relative_top": relative_top,
        "prompt_template": target.prompt_template,
    }
    try:
        info = _log_pyfunc("pyfunc_uld_composite.py", artifacts, config, name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    ref = _registered_version(info, name)
    all_tags = {KIND_TAG: "uld_composite", **tags}
    if target.corpus is not None:
        all_tags[CORPUS_TAG] = json.dumps(target.corpus, sort_keys=True)
    _tag_and_alias(ref, all_tags, alias)
    return ref


def _tag_and_alias(ref: ModelRef, tags: dict[str, str], alias: str | None) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(ref.name, ref.version, key, str(value))
    if alias:
        client.set_registered_model_alias(ref.name, alias, ref.version)


def aliases_of(ref: ModelRef) -> list[str]:
    return list(MlflowClient().get_model_version(ref.name, ref.version).aliases)


# ------------------------------------------------------------------ lineage (what a version contains)

# A batch version (one assistant for several tickets) carries `expunge.tickets` and one searchable tag per ticket.
SERVES_TAG_PREFIX = "expunge.serves."


def tickets_served(tags: dict[str, str]) -> list[str]:
    """The tickets whose erasure a version made: a batch's list, or the one ticket."""
    if tags.get("expunge.tickets"):
        return tags["expunge.tickets"].split(",")
    return [tags["expunge.ticket_id"]] if tags.get("expunge.ticket_id") else []



def lineage(uri: str, max_versions: int = 1000) -> list[dict[str, Any]]:
    """The version `uri` names, then each version it was built on (tag `expunge.parent_uri`), down to the base:
    which ticket made each, how, whether its gates passed, the release decision, how many corpus records its
    lineage erased (`expunge.erased_count`) and, for a composite, how many assistants it serves. For auditors:
    the erasures a served model contains are exactly the tickets on this path."""
    rows: list[dict[str, Any]] = []
    seen: set[ModelRef] = set()
    client = MlflowClient()
    current: str | None = uri
    while current and current.startswith("models:/") and len(rows) < max_versions:
        ref = pin(current)
        if ref in seen:
            raise ValueError(f"{ref.uri} is its own ancestor (its expunge.parent_uri tags form a loop)")
        seen.add(ref)
        version = client.get_model_version(ref.name, ref.version)
        tags = dict(version.tags)
        spec = _pyfunc_spec_only(ref) if tags.get(KIND_TAG) == "uld_composite" else {}
        rows.append({
            "uri": ref.uri,
            "aliases": sorted(version.aliases),
            "kind": tags.get(KIND_TAG, "causal_lm"),
            "ticket_id": tags.get("expunge.ticket_id") or tags.get("expunge.batch_id"),
            "ticket_ids": tickets_served(tags),
            "method": tags.get("expunge.method"),
            "gates": tags.get("expunge.gates"),
            "release": tags.get("expunge.release.decision"),
            "reviewer": tags.get("expunge.release.reviewer"),
            "erased_records": int(tags["expunge.erased_count"]) if "expunge.erased_count" in tags else None,
            "assistants": len(model_config_of(spec).get("assistants", [])) if spec else None,
            "parent_uri": tags.get("expunge.parent_uri"),
        })
        current = tags.get("expunge.parent_uri")
    return rows


# ------------------------------------------------------------------ release (human approval)

CHAMPION, CHALLENGER, PREVIOUS_CHAMPION = "champion", "challenger", "previous-champion"


def current_alias(name: str, alias: str) -> ModelRef | None:
    """The version an alias points at now, or None when the alias is not set."""
    try:
        mv = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return ModelRef(name, str(mv.version))


def promote_to_champion(ref: ModelRef, tags: dict[str, str]) -> ModelRef | None:
    """Move `champion` to `ref` (the old champion keeps `previous-champion`, for rollback), drop `ref`'s
    `challenger` alias, tag the version with the decision. Returns the previous champion, if any."""
    client = MlflowClient()
    previous = current_alias(ref.name, CHAMPION)
    if previous is not None and previous != ref:
        client.set_registered_model_alias(ref.name, PREVIOUS_CHAMPION, previous.version)
    client.set_registered_model_alias(ref.name, CHAMPION, ref.version)
    if current_alias(ref.name, CHALLENGER) == ref:
        client.delete_registered_model_alias(ref.name, CHALLENGER)
    _tag_and_alias(ref, tags, None)
    return previous if previous != ref else None


ORPHANED_TAG = "expunge.orphaned"


def mark_orphaned_versions(ticket_id: str, reason: str) -> list[str]:
    """Versions an interrupted run of `ticket_id` registered before it could record them: tagged orphaned and
    stripped of `challenger`, so only the run that completes the ticket leaves a servable version. Their URIs.
    Found by their own tag and by their MLflow run's: a run lost between `log_model` and the tagging leaves a
    version with no tags at all."""
    client = MlflowClient()
    orphans = []
    for version in _versions_of_ticket(client, ticket_id):
        if version.tags.get(ORPHANED_TAG):
            continue
        ref = ModelRef(version.name, str(version.version))
        if current_alias(ref.name, CHALLENGER) == ref:
            client.delete_registered_model_alias(ref.name, CHALLENGER)
        client.set_model_version_tag(ref.name, ref.version, "expunge.ticket_id", ticket_id)
        client.set_model_version_tag(ref.name, ref.version, ORPHANED_TAG, reason)
        orphans.append(ref.uri)
    return orphans


def _versions_of_ticket(client: MlflowClient, ticket_id: str) -> list:
    """Versions tagged with `ticket_id` (or serving it in a batch), and those registered from an MLflow run tagged
    with it."""
    filters = (f"tags.`expunge.ticket_id` = '{ticket_id}'", f"tags.`{SERVES_TAG_PREFIX}{ticket_id}` = 'true'")
    found = {(v.name, v.version): v for query in filters for v in client.search_model_versions(query)}
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    runs = [run for query in filters for run in client.search_runs([experiment.experiment_id], query)] \
        if experiment is not None else []
    for run in runs:
        for version in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
            found.setdefault((version.name, version.version), version)
    return sorted(found.values(), key=lambda v: (v.name, int(v.version)))


def withdraw_challenger(ref: ModelRef, tags: dict[str, str]) -> None:
    """A reviewer declined `ref`: it loses `challenger` (if it holds it) and records the decision."""
    if current_alias(ref.name, CHALLENGER) == ref:
        MlflowClient().delete_registered_model_alias(ref.name, CHALLENGER)
    _tag_and_alias(ref, tags, None)


def roll_back_champion(name: str, to: ModelRef, tags: dict[str, str]) -> ModelRef | None:
    """Move `champion` of `name` back to `to`; the version it leaves is tagged with `tags` (who, why) and keeps
    no alias but `previous-champion`. Idempotent: returns the version it left, None when `to` already serves."""
    client = MlflowClient()
    current = current_alias(name, CHAMPION)
    if current == to:
        return None
    client.set_registered_model_alias(name, CHAMPION, to.version)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, current.version)
        for key, value in tags.items():
            client.set_model_version_tag(name, current.version, key, value)
    return current


# ------------------------------------------------------------------ consolidation (assistants deleted)

ASSISTANTS_DELETED_TAG = "expunge.assistants_deleted"


def delete_assistant_artifacts(ref: ModelRef, replaced_by: str) -> int:
    """Delete a composite version's assistant artifacts (through the artifact store's own API, local or remote) and
    tag it `expunge.assistants_deleted` with the version that replaced it: it can no longer be served or rolled
    back to. Idempotent; the number of adapter directories deleted now."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = MlflowClient()
    version = client.get_model_version(ref.name, ref.version)
    # MLflow 3 registers a logged model: its files are at the logged model's location, not behind `models:/m-…`
    model_id = getattr(version, "model_id", None) or (
        version.source.removeprefix("models:/") if version.source.startswith("models:/m-") else None)
    root = mlflow.get_logged_model(model_id).artifact_location if model_id else version.source
    repo = get_artifact_repository(root)
    deleted = 0
    for entry in repo.list_artifacts("artifacts"):
        if Path(entry.path).name.startswith("assistant_"):
            repo.delete_artifacts(entry.path)
            deleted += 1
    client.set_model_version_tag(ref.name, ref.version, ASSISTANTS_DELETED_TAG, replaced_by)
    return deleted
