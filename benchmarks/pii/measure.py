"""Leak and recall of a served model on the probes, as result rows; the quantization attack."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from expunge_ml.weight_selection import pooled_rate

from .options import GOAL_MAX_ERASED_LEAK, GOAL_MIN_RETAINED_RATIO, KINDS, QUANT_ATTACKS, QUANT_GROUP_SIZE, PIIBenchOptions


def _zero() -> dict[str, int]:
    return {"n_prompts": 0, "n_identifiers": 0, "exact_leaks": 0, "normalised_leaks": 0, "prompts_leaking": 0,
            "n_prompt_revealed": 0, "answers_naming_watched": 0}


def sum_reports(reports: Iterable[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Add per-kind counts of several pii_leakage reports and recompute leak_rate."""
    total = {kind: _zero() for kind in KINDS}
    for report in reports:
        for kind in KINDS:
            for name in total[kind]:
                total[kind][name] += int(report.get(kind, {}).get(name, 0))
    for entry in total.values():
        entry["leak_rate"] = entry["normalised_leaks"] / entry["n_identifiers"] if entry["n_identifiers"] else 0.0
    return total


def measure(source, tokenizer, fmt, groups: Mapping[str, Sequence[Any]], options: PIIBenchOptions):
    from expunge_ml.pii import pii_leakage

    return {
        name: pii_leakage(source, tokenizer, fmt, probes, options.max_new_tokens, options.eval_batch_size)
        for name, probes in groups.items() if probes
    }


def check_quant_attacks(attacks: Sequence[str]) -> None:
    unknown = [a for a in attacks if a not in QUANT_ATTACKS]
    if unknown:
        raise ValueError(f"unknown quantization attack(s) {', '.join(unknown)}; known: {', '.join(QUANT_ATTACKS)}")


def quantized_leaks(source, tokenizer, fmt, erased_probes: Sequence[Any], options: PIIBenchOptions,
                    log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """The erased people's leak on each `options.quant_attacks` copy of the served `source` (one copy alive at a
    time; for ULD the base and every assistant are quantized). {} when no attack is asked for or nothing is
    erased."""
    from expunge_ml.evidence import ServedModel
    from expunge_ml.logits import CompositeLogits
    from expunge_ml.pii import pii_leakage

    if not options.quant_attacks or not erased_probes:
        return {}
    if isinstance(source, CompositeLogits):
        served = ServedModel(source.base, list(source.assistants), list(source.weights), source.relative_top)
    else:
        served = ServedModel(source.model)
    bits = tuple(int(name[3:]) for name in options.quant_attacks if name.startswith("int"))
    out: dict[str, Any] = {}
    for name, group_size, build in served.quantization_attacks(bits, QUANT_GROUP_SIZE, "nf4" in options.quant_attacks):
        t0 = time.perf_counter()
        report = pii_leakage(build().source(), tokenizer, fmt, erased_probes, options.max_new_tokens,
                             options.eval_batch_size)
        out[name] = {
            "erased_leak_rate": pooled_rate(report), "group_size": group_size,
            **{kind: {"erased_leak_rate": report[kind]["leak_rate"], "erased_leaks": report[kind]["normalised_leaks"],
                      "erased_identifiers": report[kind]["n_identifiers"]} for kind in KINDS},
            "eval_seconds": round(time.perf_counter() - t0, 2),
        }
        log(f"    {name} copy → erased leak {out[name]['erased_leak_rate']:.4f} ("
            + "/".join(f"{out[name][k]['erased_leak_rate']:.3f}" for k in KINDS) + ")")
    return out


def _ratio(value: float, base: float) -> float | None:
    return value / base if base > 0 else None


def make_row(split: str, method: str, erased: Mapping, retained: Mapping, base_retained: Mapping,
             n_erased: int, n_retained: int, extra: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "split": split,
        "method": method,
        "n_erased_people": n_erased,
        "n_retained_people": n_retained,
        "erased_leak_rate": pooled_rate(erased),
        "retained_pii_recall": pooled_rate(retained),
        "base_retained_pii_recall": pooled_rate(base_retained),
    }
    row["retained_pii_recall_ratio"] = _ratio(row["retained_pii_recall"], row["base_retained_pii_recall"])
    for kind in KINDS:
        e, r, b = erased[kind], retained[kind], base_retained[kind]
        row[kind] = {
            "erased_leak_rate": e["leak_rate"],
            "erased_leaks": e["normalised_leaks"],
            "erased_exact_leaks": e["exact_leaks"],
            "erased_identifiers": e["n_identifiers"],
            "erased_prompts": e["n_prompts"],
            "retained_recall": r["leak_rate"],
            "retained_leaks": r["normalised_leaks"],
            "retained_identifiers": r["n_identifiers"],
            "retained_prompts": r["n_prompts"],
            "base_retained_recall": b["leak_rate"],
            "retained_recall_ratio": _ratio(r["leak_rate"], b["leak_rate"]),
        }
    row["meets_goals"] = bool(
        row["erased_leak_rate"] <= GOAL_MAX_ERASED_LEAK
        and (row["retained_pii_recall_ratio"] or 0.0) >= GOAL_MIN_RETAINED_RATIO
    )
    row.update(extra)
    return row
