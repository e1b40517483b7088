"""Register the unlearned model as a new MLflow model version (alias `challenger` only if gates pass)."""
from __future__ import annotations

import re
from pathlib import Path

import mlflow
from prefect import get_run_logger, task

from expunge_ml.corpus import erased_lineage
from expunge_ml.prompting import DEFAULT_PROMPT_TEMPLATE
from models_registry.registry import (
    SERVES_TAG_PREFIX, ResolvedTarget, aliases_of, register_causal_lm, register_uld_composite,
)
from tasks.context import read_json, request_spec, settings_for, write_json
from tasks.contracts import Evaluation, Registration, ResolvedRequest, TrainedUnlearning

UNLEARNED_SUFFIX = "-unlearned"


def unlearned_name(location: str) -> str:
    """`<name>-unlearned` for a model outside the registry: its directory's or hub id's last part, in the
    characters a registry name allows, so unrelated models' versions never interleave under one name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(location.rstrip("/")).name).strip("-._") or "model"
    return stem[: 100 - len(UNLEARNED_SUFFIX)] + UNLEARNED_SUFFIX


def registered_name_for(requested: str | None, target: ResolvedTarget) -> str:
    """The request's `registered_name`, else the target's own registered name, else `unlearned_name`."""
    return requested or target.registered_name or unlearned_name(target.requested_uri)


def _flat_metrics(metrics: dict) -> dict[str, float]:
    """model.split.metric → value; metrics that do not apply (None, e.g. fact recall without facts) are left out."""
    return {
        f"{model}.{split}.{name}": float(value)
        for model, splits in metrics.items()
        for split, values in splits.items()
        for name, value in values.items()
        if value is not None
    }


def _target(target_info: dict) -> ResolvedTarget:
    return ResolvedTarget(
        requested_uri=target_info["requested_uri"], pinned_uri=target_info["pinned_uri"],
        registered_name=target_info["registered_name"], kind=target_info["kind"],
        base_location=target_info["base_location"], base_uri=target_info["base_uri"],
        base_weights_sha256=target_info["base_weights_sha256"], corpus=target_info["corpus"],
        prompt_template=target_info["prompt_template"] or DEFAULT_PROMPT_TEMPLATE,
        prior_assistants=target_info["prior_assistants"], relative_top=target_info["relative_top"],
    )


def _version_tags(ticket_id: str, resolved: ResolvedRequest, trained: TrainedUnlearning, evaluated: Evaluation,
                  parent_uri: str, erased_count: int) -> dict[str, str]:
    return {
        "expunge.ticket_id": ticket_id,
        "expunge.method": trained.method,
        "expunge.forget_fingerprint": resolved.forget_fingerprint,
        "expunge.retain_fingerprint": resolved.retain_fingerprint,
        "expunge.forget_count": str(resolved.forget_count),
        "expunge.erased_count": str(erased_count),  # this erasure's records and every earlier one's
        "expunge.parent_uri": parent_uri,
        "expunge.gates": "passed" if evaluated.passed else "failed",
        **{f"expunge.metric.{k}": f"{v:.4f}" for k, v in _flat_metrics(evaluated.metrics).items()},
    }


def _log_run(settings, ticket_id: str, resolved: ResolvedRequest, trained: TrainedUnlearning,
             evaluated: Evaluation) -> None:
    """The MLflow run's parameters, metrics and evidence files (ids, hashes and numbers only)."""
    mlflow.set_tags({"expunge.ticket_id": ticket_id, "expunge.method": trained.method})
    mlflow.log_params({f"{trained.method}.{k}": v for k, v in trained.config.items()})
    mlflow.log_params({"forget_count": resolved.forget_count, "retain_count": resolved.retain_count})
    if trained.weight_selection:  # the config's `weight` is the profile's; this is the w the version serves
        mlflow.log_params({f"{trained.method}.served_weight": trained.weight_selection["weight"]})
    mlflow.log_metrics({k.replace(".", "_"): v for k, v in _flat_metrics(evaluated.metrics).items()})
    mlflow.log_artifact(evaluated.metrics_path, artifact_path="evidence")
    mlflow.log_artifact(resolved.forget_manifest, artifact_path="evidence")
    mlflow.log_artifact(str(settings.ticket_dir(ticket_id) / "training.json"), artifact_path="evidence")


@task(name="mark-orphaned-versions")
def mark_orphans(home: str, profile: str, ticket_id: str) -> list[str]:
    """After a run lost during registering: the versions it left are tagged orphaned (`registry.mark_orphaned_versions`)."""
    from models_registry.registry import mark_orphaned_versions

    settings_for(home, profile)
    return mark_orphaned_versions(ticket_id, "lease_expired")


def _register_version(settings, name: str, target: ResolvedTarget, trained: TrainedUnlearning, tags: dict,
                      alias: str | None, erased_path: Path):
    """The new version, in the MLflow run open now: the whole edited model, or the pinned base's composite with the
    (sealed) assistants."""
    if trained.model_dir:  # the method changed the weights: the version carries the whole model
        return register_causal_lm(
            Path(trained.model_dir), name, trained.weights_sha256, corpus=target.corpus,
            prompt_template=target.prompt_template or DEFAULT_PROMPT_TEMPLATE, tags=tags, alias=alias,
            erased_records=erased_path,
        )
    seal_key = settings.adapter_seal_key()  # assistants: the version references the pinned base, carries adapters
    return register_uld_composite(
        name, target, [{"dir": a.path, "weight": a.weight} for a in trained.new_adapters(seal_key)],
        relative_top=float(trained.config["relative_top"]), tags=tags, alias=alias,
        erased_records=erased_path, seal_key=seal_key,
    )


def _answers_from_registry(uri: str) -> None:
    """The version must actually load from the registry and answer, or it is not a deliverable."""
    import pandas as pd

    model = mlflow.pyfunc.load_model(uri)
    probe = model.predict(pd.DataFrame({"question": ["What is the capital of nowhere?"]}))
    if not isinstance(probe, list) or len(probe) != 1:
        raise RuntimeError(f"{uri} loaded but did not generate")


@task(name="register-model", retries=1, retry_delay_seconds=2)
def register_model(home: str, profile: str, ticket_id: str, resolved: ResolvedRequest, trained: TrainedUnlearning,
                   evaluated: Evaluation) -> Registration:
    settings = settings_for(home, profile)
    target_info = read_json(resolved.target_path)
    target = _target(target_info)
    name = registered_name_for(request_spec(settings, ticket_id).registered_name, target)
    # The version remembers what it erased (keyed hashes), so an erasure built on it later leaves those out.
    erased = erased_lineage(target_info.get("erased_before"), read_json(resolved.forget_manifest),
                            settings.hmac_key())
    erased_path = write_json(settings.ticket_dir(ticket_id) / "erased_records.json", erased)
    tags = _version_tags(ticket_id, resolved, trained, evaluated, target.pinned_uri or target.requested_uri,
                         erased["count"])
    alias = "challenger" if evaluated.passed else None
    with mlflow.start_run(run_name=f"{ticket_id}-{trained.method}") as run:
        _log_run(settings, ticket_id, resolved, trained, evaluated)
        ref = _register_version(settings, name, target, trained, tags, alias, erased_path)
        run_id = run.info.run_id
    _answers_from_registry(ref.uri)
    registration = Registration(model_uri=ref.uri, name=ref.name, version=ref.version, mlflow_run_id=run_id,
                                aliases=tuple(aliases_of(ref)))
    get_run_logger().info("registered %s (aliases: %s)", ref.uri, ", ".join(registration.aliases) or "none")
    write_json(settings.ticket_dir(ticket_id) / "registration.json", registration.as_json())
    return registration


def _batch_tags(batch_id: str, tickets: list[str], joined: ResolvedRequest, trained: TrainedUnlearning,
                parent_uri: str, erased_count: int) -> dict[str, str]:
    """A batch version names every ticket it serves (`expunge.tickets`, and one `expunge.serves.<ticket>` tag each,
    which the registry can search by)."""
    return {
        "expunge.batch_id": batch_id,
        "expunge.tickets": ",".join(tickets),
        **{f"{SERVES_TAG_PREFIX}{ticket}": "true" for ticket in tickets},
        "expunge.method": trained.method,
        "expunge.forget_fingerprint": joined.forget_fingerprint,
        "expunge.retain_fingerprint": joined.retain_fingerprint,
        "expunge.forget_count": str(joined.forget_count),
        "expunge.erased_count": str(erased_count),
        "expunge.parent_uri": parent_uri,
        "expunge.gates": "passed",  # a batch registers only when every ticket passed its own gates
    }


@task(name="register-batch", retries=1, retry_delay_seconds=2)
def register_batch(home: str, profile: str, batch_id: str, joined: ResolvedRequest, trained: TrainedUnlearning,
                   evaluations: dict[str, Evaluation]) -> Registration:
    """One version serving every ticket of the batch, each of which passed its own gates (alias `challenger`);
    the MLflow run holds each ticket's evidence under `evidence/<ticket>/`."""
    settings = settings_for(home, profile)
    tickets = sorted(evaluations)
    if not all(e.passed for e in evaluations.values()):
        raise ValueError("a batch version is registered only when every ticket passed its gates")
    target_info = read_json(joined.target_path)
    target = _target(target_info)
    name = registered_name_for(request_spec(settings, tickets[0]).registered_name, target)
    erased = erased_lineage(target_info.get("erased_before"), read_json(joined.forget_manifest), settings.hmac_key())
    erased_path = write_json(settings.ticket_dir(batch_id) / "erased_records.json", erased)
    tags = _batch_tags(batch_id, tickets, joined, trained, target.pinned_uri or target.requested_uri, erased["count"])
    with mlflow.start_run(run_name=f"{batch_id}-{trained.method}") as run:
        mlflow.set_tags({k: v for k, v in tags.items() if not k.startswith("expunge.forget")})
        mlflow.log_params({f"{trained.method}.{k}": v for k, v in trained.config.items()})
        mlflow.log_params({"forget_count": joined.forget_count, "retain_count": joined.retain_count,
                           "tickets": len(tickets)})
        mlflow.log_artifact(str(settings.ticket_dir(batch_id) / "training.json"), artifact_path="evidence")
        for ticket, evaluated in evaluations.items():
            mlflow.log_metrics({f"{ticket}.{k}".replace(".", "_"): v
                                for k, v in _flat_metrics(evaluated.metrics).items()})
            mlflow.log_artifact(evaluated.metrics_path, artifact_path=f"evidence/{ticket}")
        ref = _register_version(settings, name, target, trained, tags, "challenger", erased_path)
        run_id = run.info.run_id
    _answers_from_registry(ref.uri)
    registration = Registration(model_uri=ref.uri, name=ref.name, version=ref.version, mlflow_run_id=run_id,
                                aliases=tuple(aliases_of(ref)))
    get_run_logger().info("registered %s for %d tickets (aliases: %s)", ref.uri, len(tickets),
                          ", ".join(registration.aliases) or "none")
    for ticket in tickets:  # each ticket's report reads its registration and the training it shares
        write_json(settings.ticket_dir(ticket) / "registration.json", registration.as_json())
        write_json(settings.ticket_dir(ticket) / "training.json", trained.as_json())
    return registration
