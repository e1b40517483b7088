"""Evaluate the served model before vs after the erasure, and apply the request type's gates."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import get_run_logger, task

from expunge_ml.evidence import EvidenceOptions, collect_evidence, prior_knowledge, probes_for, regression_evidence
from expunge_ml.fluency import FluencyJudge, load_fluency_judge
from expunge_ml.gates import check_gates, gates_for
from expunge_ml.serving import load_base, served_model
from tasks.context import read_json, request_spec, settings_for, write_json
from tasks.contracts import Evaluation, ResolvedRequest, TrainedUnlearning
from tasks.data import (
    earlier_erasure_records, general_records, held_out_retain, holdout_records, records_for_manifest,
)
from tasks.unlearn import prior_adapters, prompt_format, target_base


def fluency_judge(home: Path, location: str | None, device: str) -> FluencyJudge | None:
    """The profile's `evaluation.fluency_judge`: a local model directory, relative to the home (where `make
    smollm2` puts SmolLM2) or absolute. A judge that is configured but missing is an error, not a silent skip."""
    if not location:
        return None
    path = Path(location) if Path(location).is_absolute() else Path(home) / location
    if not path.is_dir():
        raise FileNotFoundError(f"evaluation.fluency_judge: no model directory at {path} (for SmolLM2: make smollm2)")
    return load_fluency_judge(str(path), device)


def served_after(base, target_info: dict, trained: TrainedUnlearning, settings):
    """The model this erasure would serve: the target with this erasure's assistants added, or the edited copy."""
    if trained.model_dir:  # the method edited the weights themselves
        return served_model(load_base(trained.model_dir, trained.weights_sha256, device=settings.device,
                                      dtype=settings.dtype)[0])
    key = settings.adapter_seal_key()
    return served_model(base, prior_adapters(target_info, key) + trained.new_adapters(key))


NOTHING_TO_FORGET_ACTIONS = ("warn", "review")


@task(name="measure-prior-knowledge")
def measure_prior_knowledge(home: str, profile: str, ticket_id: str, resolved: ResolvedRequest) -> dict:
    """Before any training: does the target as served now state the forget set more readily than answers about
    people it never saw (`expunge_ml.evidence.prior_knowledge`)? Written to prior_knowledge.json (numbers only),
    with the profile's `unlearning.nothing_to_forget` action: warn (default) or review."""
    settings = settings_for(home, profile)
    action = settings.profile["unlearning"].get("nothing_to_forget", "warn")
    if action not in NOTHING_TO_FORGET_ACTIONS:
        raise ValueError(f"unlearning.nothing_to_forget must be one of {NOTHING_TO_FORGET_ACTIONS}, got {action!r}")
    target_info = read_json(resolved.target_path)
    forget = records_for_manifest(settings, target_info, resolved.forget_manifest)
    base, tokenizer = target_base(target_info, settings)
    evaluation = settings.profile["evaluation"]
    holdout = holdout_records(target_info, forget, int(evaluation.get("holdout_max", 64)))
    served_now = served_model(base, prior_adapters(target_info, settings.adapter_seal_key()))
    known = prior_knowledge(served_now.source(), tokenizer, prompt_format(target_info), forget, holdout,
                            int(evaluation["max_new_tokens"]), int(evaluation["batch_size"]))
    known["action"] = action
    write_json(settings.ticket_dir(ticket_id) / "prior_knowledge.json", known)
    if known["known"] is False:
        get_run_logger().warning("nothing_to_forget: the target's %s on the forget questions is only %.2f above "
                                 "its level on people it never saw (at least %.2f expected)",
                                 known["metric"], known["margin"], known["min_margin"])
    return known


@task(name="evaluate-unlearning")
def evaluate_unlearning(home: str, profile: str, ticket_id: str, resolved: ResolvedRequest,
                        trained: TrainedUnlearning) -> Evaluation:
    settings = settings_for(home, profile)
    config = settings.profile["evaluation"]
    spec = request_spec(settings, ticket_id)
    target_info = read_json(resolved.target_path)
    forget = records_for_manifest(settings, target_info, resolved.forget_manifest)
    train_retain_ids = {e["record_id"] for e in read_json(resolved.retain_manifest)["records"]}
    retain = held_out_retain(target_info, {r.record_id for r in forget}, train_retain_ids, int(config["retain_eval_max"]))
    base, tokenizer = target_base(target_info, settings)
    # "Before" is the target as served now (earlier erasures included): that is what this request changes.
    before = served_model(base, prior_adapters(target_info, settings.adapter_seal_key()))
    after = served_after(base, target_info, trained, settings)
    erased = probes_for(forget, spec.subject.identifiers) if spec.type == "privacy_erasure" else []
    retained = probes_for(retain) if spec.type == "privacy_erasure" else []
    holdout = holdout_records(target_info, forget, int(config.get("holdout_max", 64)))
    general = general_records(target_info, int(config.get("general_max", 48)))
    options = EvidenceOptions.from_profile(config)
    evidence = collect_evidence(
        before, after, tokenizer, prompt_format(target_info), forget, retain, erased, retained,
        options, holdout=holdout, judge=fluency_judge(settings.home, options.fluency_judge, settings.device),
        general=general,
        progress=lambda part, done, total, seconds: get_run_logger().info(
            "evaluation %d/%d: %s in %.0fs", done, total, part, seconds),
    )
    earlier = earlier_erasure_records(target_info, int(config.get("regression_per_erasure", 8)))
    if earlier:  # every erasure already served must stay erased in the new version
        evidence["regression"] = regression_evidence(before, after, tokenizer, prompt_format(target_info), earlier,
                                                     evidence["max_new_tokens"], options.batch_size)
        get_run_logger().info("regression: %d earlier erasure(s), largest rise %.3f",
                              evidence["regression"]["n_erasures"], evidence["regression"]["max_rise"])
    evidence["prompt_template"] = prompt_format(target_info).template  # the frame every question was asked in
    prior = settings.ticket_dir(ticket_id) / "prior_knowledge.json"
    if prior.exists():
        evidence["prior_knowledge"] = read_json(prior)
    gates = tuple(g.as_dict() for g in check_gates(evidence, gates_for(spec.type, settings.profile["gates"])))
    work = settings.ticket_dir(ticket_id)
    evaluation = Evaluation(request_type=spec.type, metrics=evidence["metrics"], gates=gates,
                            passed=all(g["passed"] for g in gates),
                            evidence_path=str(write_json(work / "evidence.json", evidence)))
    evaluation = dataclasses.replace(evaluation, metrics_path=str(write_json(work / "metrics.json", evaluation.as_json())))
    m = evaluation.metrics
    get_run_logger().info(
        "forget ROUGE-L %.3f → %.3f; retain ROUGE-L %.3f → %.3f; gates %s",
        m["base"]["forget"]["rougeL_recall"], m["unlearned"]["forget"]["rougeL_recall"],
        m["base"]["retain"]["rougeL_recall"], m["unlearned"]["retain"]["rougeL_recall"],
        "passed" if evaluation.passed else "FAILED: " + ", ".join(g["gate"] for g in evaluation.failed_gates()),
    )
    return evaluation
