"""Evaluate base vs unlearned model on forget and held-out retain questions, then apply the gates."""
from __future__ import annotations

import random

from prefect import get_run_logger, task

from expunge_ml.corpus import CorpusSpec, load_corpus
from expunge_ml.evaluation import evaluate_splits
from expunge_ml.logits import CausalLMLogits, CompositeLogits
from expunge_ml.methods.uld import load_assistant
from tasks.context import read_json, settings_for, write_json
from tasks.data import records_for_manifest
from tasks.unlearn import load_base, prompt_format


def served_source(base, adapters: list[dict]):
    """What users are served: the base alone, or base + Σ w·assistant over every erasure so far."""
    if not adapters:
        return CausalLMLogits(base)
    loaded = [load_assistant(base, adapter["dir"]) for adapter in adapters]
    weights = [
        float(adapter["weight"]) if adapter.get("weight") is not None else config.weight
        for adapter, (_, config) in zip(adapters, loaded)
    ]
    return CompositeLogits(base, [model for model, _ in loaded], weights, loaded[-1][1].relative_top)


def held_out_retain(target_info: dict, forget_ids: set[str], train_retain_ids: set[str], limit: int, seed: int = 1):
    """Retain questions the assistant never trained on, so utility is measured, not memorised."""
    records = load_corpus(CorpusSpec(**target_info["corpus"]))
    unseen = [r for r in records if r.record_id not in forget_ids and r.record_id not in train_retain_ids]
    pool = unseen if len(unseen) >= limit else [r for r in records if r.record_id not in forget_ids]
    random.Random(seed).shuffle(pool)
    return pool[:limit]


def check_gates(metrics: dict, gates: dict) -> list[dict]:
    """Each gate with its threshold, measured value and pass/fail; the margin says by how much."""
    base, unlearned = metrics["base"], metrics["unlearned"]
    retain_ratio = unlearned["retain"]["rougeL_recall"] / max(base["retain"]["rougeL_recall"], 1e-9)
    checks = [
        ("forget_rougeL_recall", unlearned["forget"]["rougeL_recall"], "<=", gates["max_forget_rougeL"]),
        ("retain_rougeL_ratio", retain_ratio, ">=", gates["min_retain_rougeL_ratio"]),
    ]
    results = []
    for name, value, op, threshold in checks:
        passed = value <= threshold if op == "<=" else value >= threshold
        results.append({"gate": name, "value": round(value, 4), "op": op, "threshold": threshold,
                        "passed": passed, "margin": round(threshold - value if op == "<=" else value - threshold, 4)})
    return results


@task(name="evaluate-unlearning")
def evaluate_unlearning(home: str, profile: str, ticket_id: str, resolved: dict, trained: dict) -> dict:
    settings = settings_for(home, profile)
    config = settings.profile["evaluation"]
    target_info = read_json(resolved["target_path"])
    forget = records_for_manifest(settings, target_info, resolved["forget_manifest"])
    train_retain_ids = {e["record_id"] for e in read_json(resolved["retain_manifest"])["records"]}
    retain = held_out_retain(target_info, {r.record_id for r in forget}, train_retain_ids, int(config["retain_eval_max"]))
    splits = {"forget": forget, "retain": retain}
    base, tokenizer = load_base(target_info)
    fmt = prompt_format(target_info)
    kwargs = {"max_new_tokens": int(config["max_new_tokens"]), "batch_size": int(config["batch_size"])}
    # "Before" is the target as served now (earlier erasures included): that is what this request changes.
    prior = list(target_info.get("prior_assistants", []))
    before = evaluate_splits(served_source(base, prior), tokenizer, fmt, splits, **kwargs)
    after_adapters = prior + [{"dir": trained["adapter_dir"], "weight": None}]
    after = evaluate_splits(served_source(base, after_adapters), tokenizer, fmt, splits, **kwargs)
    metrics = {
        "base": {k: v.as_dict() for k, v in before.items()},
        "unlearned": {k: v.as_dict() for k, v in after.items()},
    }
    gates = check_gates(metrics, settings.profile["gates"])
    result = {"metrics": metrics, "gates": gates, "passed": all(g["passed"] for g in gates)}
    result["metrics_path"] = str(write_json(settings.ticket_dir(ticket_id) / "metrics.json", result))
    get_run_logger().info(
        "forget ROUGE-L %.3f → %.3f; retain ROUGE-L %.3f → %.3f; gates %s",
        metrics["base"]["forget"]["rougeL_recall"], metrics["unlearned"]["forget"]["rougeL_recall"],
        metrics["base"]["retain"]["rougeL_recall"], metrics["unlearned"]["retain"]["rougeL_recall"],
        "passed" if result["passed"] else "FAILED",
    )
    return result
