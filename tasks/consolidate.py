"""Consolidating a champion that serves stacked assistants (`expunge_ml.consolidation`): distil it into one model,
gate it against the champion, register it; once a reviewer releases it, delete the assistants it replaces.

The gates compare the consolidated model with the champion it replaces: every erasure in the lineage must stay
erased (`max_earlier_erasure_rise` over each erased subject's records) and what was kept must stay
(`min_retain_rougeL_ratio` on retained records the distillation never saw; `min_general_ratio` where the corpus
names general questions). Thresholds are the profile's privacy-erasure gates of those names (defaults below).
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import mlflow
from prefect import get_run_logger, task

from expunge_ml.consolidation import ConsolidationConfig, distill
from expunge_ml.corpus import CorpusSpec, erased_record_ids, load_corpus, load_general, unseen_records
from expunge_ml.evaluation import evaluate_splits
from expunge_ml.evidence import regression_evidence
from expunge_ml.gates import check_gates
from expunge_ml.modeling import weights_fingerprint
from expunge_ml.serving import served_model
from models_registry.registry import (
    CHAMPION, current_alias, delete_assistant_artifacts, lineage, pin, promote_to_champion, register_causal_lm,
    resolve_target, version_tags,
)
from tasks.context import read_json, settings_for, write_json
from tasks.data import at_most_per_subject
from tasks.unlearn import prior_adapters, prompt_format, target_base

# Thresholds where the profile's privacy-erasure gates name none: a consolidation always has these checked.
CONSOLIDATION_GATES = {"max_earlier_erasure_rise": 0.1, "min_retain_rougeL_ratio": 0.9, "min_general_ratio": 0.9}
CONSOLIDATES_TAG = "expunge.consolidates"


def consolidation_config(profile: dict) -> ConsolidationConfig:
    """The profile's `consolidation` section over the defaults."""
    known = {f.name for f in dataclasses.fields(ConsolidationConfig)}
    values = {k: v for k, v in (profile.get("consolidation") or {}).items() if k in known}
    return ConsolidationConfig(**values)


@task(name="plan-consolidation")
def plan_consolidation(home: str, profile: str, model_name: str, min_assistants: int) -> dict:
    """{"champion": URI, "assistants": N, "work": dir} when the champion of `model_name` serves at least
    `min_assistants` assistants, else {"skip": why}."""
    settings = settings_for(home, profile)
    champion = current_alias(model_name, CHAMPION)
    if champion is None:
        return {"skip": f"{model_name} has no champion"}
    target = resolve_target(champion.uri)
    served = len(target.prior_assistants)
    if served < max(1, min_assistants):
        return {"skip": f"{champion.uri} serves {served} assistant(s); consolidated from {max(1, min_assistants)}"}
    work = settings.home / "work" / f"consolidation-{model_name}-{champion.version}"
    target_info = {"base_location": target.base_location, "base_weights_sha256": target.base_weights_sha256,
                   "prior_assistants": target.prior_assistants, "relative_top": target.relative_top,
                   "prompt_template": target.prompt_template, "corpus": target.corpus, "erased": target.erased}
    write_json(work / "target.json", target_info)
    return {"champion": champion.uri, "assistants": served, "work": str(work)}


def _records(settings, target_info: dict, retain_eval: int, retain_train: int):
    """(erased records, retained records to distil on, retained records to evaluate on, general questions)."""
    if not target_info.get("corpus") or target_info.get("erased") is None:
        raise ValueError("the champion names no corpus or erased records: nothing to distil on")
    spec = CorpusSpec(**target_info["corpus"])
    records = load_corpus(spec)
    erased_ids = erased_record_ids(records, target_info["erased"], settings.hmac_key())
    erased = [r for r in records if r.record_id in erased_ids]
    kept = unseen_records(records, erased_ids, seed=1)
    return erased, kept[retain_eval:retain_eval + retain_train], kept[:retain_eval], load_general(spec)


@task(name="distil-champion")
def distil_champion(home: str, profile: str, plan: dict) -> dict:
    """The consolidated model under `<work>/model`, and the evidence comparing it with the champion (numbers
    and counts only) in `<work>/evidence.json`."""
    settings = settings_for(home, profile)
    logger = get_run_logger()
    work = Path(plan["work"])
    target_info = read_json(work / "target.json")
    evaluation = settings.profile["evaluation"]
    erased, train_kept, eval_kept, general = _records(settings, target_info, int(evaluation["retain_eval_max"]),
                                                      int(settings.profile["unlearning"]["retain_max"]))
    base, tokenizer = target_base(target_info, settings)
    fmt = prompt_format(target_info)
    champion = served_model(base, prior_adapters(target_info, settings.adapter_seal_key()))
    config = consolidation_config(settings.profile)
    pairs = [r.pair for r in [*erased, *train_kept]]
    model, report = distill(base, champion.source(), tokenizer, fmt, pairs, config,
                            progress=lambda epoch, kl: logger.info("consolidation epoch %d/%d: KL %.4f", epoch,
                                                                   config.epochs, kl))
    model_dir = work / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    consolidated = served_model(model)
    max_new, batch = int(evaluation["max_new_tokens"]), int(evaluation["batch_size"])
    probes = at_most_per_subject(erased, int(evaluation.get("regression_per_erasure", 8)))
    splits = {"retain": eval_kept, **({"general": general[:int(evaluation.get("general_max", 48))]} if general else {})}
    metrics = {name: {split: m.as_dict() for split, m in evaluate_splits(served.source(), tokenizer, fmt, splits,
                                                                         max_new, batch).items()}
               for name, served in (("base", champion), ("unlearned", consolidated))}
    evidence = {"metrics": metrics, "regression": regression_evidence(champion, consolidated, tokenizer, fmt, probes,
                                                                      max_new, batch),
                "training": dataclasses.asdict(report), "config": dataclasses.asdict(config),
                "counts": {"erased": len(erased), "retained_trained": len(train_kept), "retained_evaluated": len(eval_kept)}}
    profile_gates = settings.profile["gates"].get("privacy_erasure", {})
    thresholds = {gate: profile_gates.get(gate, default) for gate, default in CONSOLIDATION_GATES.items()}
    gates = [g.as_dict() for g in check_gates(evidence, thresholds)]
    evidence["gates"], evidence["passed"] = gates, all(g["passed"] for g in gates)
    write_json(work / "evidence.json", evidence)
    logger.info("consolidated %s: %s", plan["champion"], ", ".join(f"{g['gate']} {g['value']}" for g in gates))
    return {"model_dir": str(model_dir), "weights_sha256": weights_fingerprint(model_dir),
            "evidence_path": str(work / "evidence.json"), "passed": evidence["passed"], "gates": gates}


@task(name="register-consolidation")
def register_consolidation(home: str, profile: str, plan: dict, distilled: dict) -> dict:
    """The consolidated model as a new version of the champion's model (a plain causal LM carrying the champion's
    erased records), `challenger` when its gates passed."""
    settings_for(home, profile)
    work = Path(plan["work"])
    target_info = read_json(work / "target.json")
    champion = pin(plan["champion"])
    erased_path = write_json(work / "erased_records.json", target_info["erased"])
    tags = {CONSOLIDATES_TAG: champion.uri, "expunge.parent_uri": champion.uri, "expunge.method": "consolidation",
            "expunge.consolidated_assistants": str(plan["assistants"]),
            "expunge.erased_count": str(target_info["erased"]["count"]),
            "expunge.gates": "passed" if distilled["passed"] else "failed"}
    with mlflow.start_run(run_name=f"consolidate-{champion.name}-{champion.version}") as run:
        mlflow.set_tags({CONSOLIDATES_TAG: champion.uri})
        mlflow.log_metrics({g["gate"]: float(g["value"]) for g in distilled["gates"] if g["value"] is not None})
        mlflow.log_artifact(distilled["evidence_path"], artifact_path="evidence")
        ref = register_causal_lm(Path(distilled["model_dir"]), champion.name, distilled["weights_sha256"],
                                 corpus=target_info["corpus"], prompt_template=prompt_format(target_info).template,
                                 tags=tags, alias="challenger" if distilled["passed"] else None,
                                 erased_records=erased_path)
    shutil.rmtree(distilled["model_dir"], ignore_errors=True)  # the registry holds it now
    get_run_logger().info("registered %s from %s (gates %s)", ref.uri, champion.uri, tags["expunge.gates"])
    return {"model_uri": ref.uri, "mlflow_run_id": run.info.run_id}


@task(name="check-consolidation-release")
def check_consolidation_release(home: str, profile: str, model_uri: str) -> dict:
    """{"champion": URI} when `model_uri` is a consolidation whose gates passed, built on the champion serving now;
    else {"refused": {reason_code, message}}."""
    settings_for(home, profile)
    ref = pin(model_uri)
    tags = version_tags(ref)
    if CONSOLIDATES_TAG not in tags:
        return {"refused": {"reason_code": "not_a_consolidation", "message": f"{ref.uri} is not a consolidation"}}
    if tags.get("expunge.gates") != "passed":
        return {"refused": {"reason_code": "not_releasable", "message": f"{ref.uri} did not pass its gates"}}
    champion = current_alias(ref.name, CHAMPION)
    if champion == ref:  # released before an interruption: what is left is deleting the assistants
        return {"champion": tags[CONSOLIDATES_TAG], "model_uri": ref.uri}
    if champion is None or champion.uri != tags[CONSOLIDATES_TAG]:
        return {"refused": {"reason_code": "stale_base", "message": f"{ref.uri} consolidates {tags[CONSOLIDATES_TAG]}, "
                            f"but the champion is {champion.uri if champion else 'unset'}: consolidate it again"}}
    return {"champion": champion.uri, "model_uri": ref.uri}


@task(name="delete-assistants")
def delete_assistants(home: str, profile: str, consolidated_uri: str) -> dict:
    """Every assistant the consolidated version replaces, gone: the adapter artifacts of each composite version on
    its lineage (`registry.delete_assistant_artifacts`; such a version can no longer be served) and the sealed
    adapters in the work directories of the tickets and batches they served. Idempotent."""
    settings = settings_for(home, profile)
    versions, tickets = [], set()
    for row in lineage(consolidated_uri)[1:]:
        if row["kind"] == "uld_composite" and row["uri"].startswith("models:/"):
            delete_assistant_artifacts(pin(row["uri"]), consolidated_uri)
            versions.append(row["uri"])
            tickets.update(row["ticket_ids"])
            if row["ticket_id"]:  # a batch version's work directory is named by its batch id
                tickets.add(row["ticket_id"])
    adapter_dirs = 0
    for directory in settings.home.joinpath("work").glob("*"):
        if directory.name in tickets:
            for adapter in directory.glob("assistant*"):
                shutil.rmtree(adapter, ignore_errors=True)
                adapter_dirs += 1
    return {"versions": versions, "work_adapter_dirs": adapter_dirs}


@task(name="promote-consolidation")
def promote_consolidation(home: str, profile: str, model_uri: str, reviewer: str) -> None:
    """`champion` → the consolidated version (the one it replaces keeps `previous-champion`)."""
    settings_for(home, profile)
    promote_to_champion(pin(model_uri), {"expunge.release.decision": "approve", "expunge.release.reviewer": reviewer})
