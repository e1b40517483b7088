"""Build the embedded default: sample world → small base model that memorised it → MLflow champion."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task

from expunge_ml.corpus import CorpusSpec
from expunge_ml.sample_base import build_sample_world, train_sample_base
from expunge_ml.smollm2 import pretrained_location
from models_registry.registry import ModelRef, register_causal_lm
from tasks.context import settings_for, write_json

PROFILE_TAG = "expunge.profile_sha256"


def profile_digest(profile: dict) -> str:
    relevant = {k: profile.get(k) for k in ("world", "tokenizer", "base_model")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


@task(name="find-existing-base")
def find_existing_base(home: str, profile: str) -> str | None:
    """Reuse a champion built from the same profile: bootstrapping is idempotent."""
    settings = settings_for(home, profile)
    name = settings.profile["base_model"]["registered_name"]
    try:
        version = MlflowClient().get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        return None
    if version.tags.get(PROFILE_TAG) == profile_digest(settings.profile):
        return ModelRef(name, str(version.version)).uri
    return None


@task(name="build-sample-world")
def build_world(home: str, profile: str) -> dict[str, str]:
    settings = settings_for(home, profile)
    paths = build_sample_world(settings.profile["world"], settings.world_dir)
    return {key: str(path) for key, path in paths.items()}


@task(name="train-sample-base")
def train_base(home: str, profile: str, world: dict[str, str]) -> dict:
    settings = settings_for(home, profile)
    logger = get_run_logger()
    cfg = settings.profile["base_model"]
    pretrained = cfg.get("pretrained")
    if pretrained:
        logger.info("preparing the pre-trained model %s (exported once, under %s)", pretrained, settings.models_dir)
        pretrained = pretrained_location(str(pretrained), settings.models_dir)
    out_dir = settings.models_dir / "sample-base"
    report = train_sample_base(
        Path(world["corpus"]), Path(world["documents"]), cfg, settings.profile.get("tokenizer", {}), out_dir,
        progress=epoch_progress(logger, int(cfg["train"]["epochs"]), every=1 if pretrained else 10),
        device=settings.device, pretrained=pretrained,
        general_path=settings.world_dir / "general.jsonl" if pretrained else None,
    )
    if report["general"]:
        report["general_path"] = str(settings.world_dir / "general.jsonl")
    report["model_dir"] = str(out_dir)
    write_json(settings.models_dir / "sample-base.json", report)
    logger.info(
        "base answers its sample world: ROUGE-L recall %.3f after %.0fs of training",
        report["memorisation"]["rougeL_recall"], report["train"]["seconds"],
    )
    return report


def epoch_progress(logger, epochs: int, every: int):
    """A progress callback for `train_on_qa`: epoch, loss, elapsed time and the time left at this pace."""
    start = time.monotonic()

    def report(epoch: int, loss: float) -> None:
        if epoch % every and epoch != 1:
            return
        elapsed = time.monotonic() - start
        logger.info("training the base: epoch %d of at most %d, loss %.4f, %.0fs elapsed, ≤ %.0fs left",
                    epoch, epochs, loss, elapsed, elapsed / epoch * (epochs - epoch))

    return report


@task(name="register-sample-base")
def register_base(home: str, profile: str, world: dict[str, str], trained: dict) -> str:
    settings = settings_for(home, profile)
    name = settings.profile["base_model"]["registered_name"]
    with mlflow.start_run(run_name="sample-base"):
        mlflow.log_params({"n_parameters": trained["n_parameters"], **settings.profile["world"]})
        mlflow.log_metrics({
            "memorisation_rougeL_recall": trained["memorisation"]["rougeL_recall"],
            "memorisation_answer_prob": trained["memorisation"]["answer_prob"],
            "train_seconds": trained["train"]["seconds"],
        })
        ref = register_causal_lm(
            Path(trained["model_dir"]), name, trained["weights_sha256"],
            corpus=CorpusSpec(source=world["corpus"], holdout=world.get("holdout", ""),
                              general=trained.get("general_path", "")).as_dict(),
            prompt_template=trained["prompt_template"],
            tags={PROFILE_TAG: profile_digest(settings.profile), "expunge.role": "sample_base"},
            alias="champion",
        )
    return ref.uri
