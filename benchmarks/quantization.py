"""`expunge benchmark quantization`: does forgotten knowledge come back after int8 / int4 quantization?

Zhang et al. 2024 ("Catastrophic failure of LLM unlearning via quantization") found that GA/NPO-style
unlearning changes the weights so little that rounding them to a 4-bit grid restores much of what was
"forgotten". This benchmark repeats the attack on the project's TOFU benchmark model: it runs the TOFU
protocol (same base, same settings — by default read from the committed `tofu.json`) for the base, GA,
NPO and ULD, then rounds every served weight to int8 and int4 (symmetric round-to-nearest, one scale per
group of input columns) and to bitsandbytes' NF4 (what a 4-bit deployment serves) — for ULD the base *and*
the merged assistant — and measures the forget metrics again.

recovery = (forget ROUGE-L after quantization − after unlearning) ÷ (base − after unlearning), clipped to
[0, 1]: the share of the forgotten answers that the attack brings back (`expunge_ml.evidence.recovery`,
the number the pipeline's quantization gate uses). kept = forget ROUGE-L ÷ the fp32 base's, the paper's
"knowledge retained" view.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from .run_config import merge
from .tofu import REPO_ROOT, TofuBenchOptions, run_tofu_benchmark

DEFAULT_TOFU_JSON = REPO_ROOT / "benchmarks" / "results" / "tofu.json"
METHODS = ("ga", "npo", "uld")
PRECISIONS = ("fp32", "int8", "int4", "nf4")  # int8/int4: our RTN; nf4: bitsandbytes
RECOVERY_GOAL = 0.05  # ULD's goal: at most 5 % of what it removed comes back


def options_from_tofu_config(config: dict[str, Any], where: str = "tofu.json config") -> TofuBenchOptions:
    """TofuBenchOptions from the `config` a tofu.json recorded (its `uld` section nested, as written).

    A key the options do not have is an error: a report from settings this code cannot run again is not
    silently run with the defaults."""
    return merge(TofuBenchOptions(), config, where)


def quantization_rows(tofu_rows: list[dict]) -> list[dict]:
    """One row per (split, method, precision) from TOFU rows that carry a "quantized" entry."""
    from expunge_ml.evidence import recovery

    rows = []
    for split in dict.fromkeys(r["split"] for r in tofu_rows):
        by = {r["method"]: r for r in tofu_rows if r["split"] == split}
        if "base" not in by:
            continue
        base_rouge, base_prob = by["base"]["forget_rougeL"], by["base"]["forget_prob"]
        for method in ("base", *METHODS):
            if method not in by:
                continue
            r = by[method]
            variants = {"fp32": r, **r.get("quantized", {})}
            for precision in PRECISIONS:
                if precision not in variants:
                    continue
                v = variants[precision]
                unlearned = method != "base"
                rows.append({
                    "split": split, "method": method, "precision": precision,
                    "forget_rougeL": v["forget_rougeL"], "forget_prob": v["forget_prob"],
                    "forget_quality": v["forget_quality"], "model_utility": v["model_utility"],
                    "kept": v["forget_rougeL"] / base_rouge if base_rouge else None,
                    # base rows: nothing was forgotten, so there is nothing to recover
                    "recovery": (recovery(base_rouge, r["forget_rougeL"], v["forget_rougeL"]) if unlearned else None),
                    "recovery_prob": (recovery(base_prob, r["forget_prob"], v["forget_prob"]) if unlearned else None),
                })
    return rows


def goal(rows: list[dict]) -> dict[str, Any]:
    """ULD recovery ≤ 5% at every quantized precision (int8, int4, nf4) and split (None = nothing removed)."""
    checks = {
        f"{r['split']}/{r['precision']}": r["recovery"] is not None and r["recovery"] <= RECOVERY_GOAL
        for r in rows if r["method"] == "uld" and r["precision"] != "fp32"
    }
    return {"uld_recovery_le_0.05": checks, "met": bool(checks) and all(checks.values())}


def run_quantization_benchmark(opts: TofuBenchOptions, out_dir: Path, command: str = "",
                               log: Callable[[str], None] | None = None) -> dict:
    opts = dataclasses.replace(
        opts, methods=METHODS, quant_bits=(8, 4), quant_nf4=True, quant_methods=("base", *METHODS), write=False, plot=False,
        dev_authors=(), retrain_seeds=(),
    )
    tofu = run_tofu_benchmark(opts, command=command, log=log)
    rows = quantization_rows(tofu["rows"])
    report = {
        "command": command,
        "started_at": tofu["started_at"],
        "wall_seconds": tofu["wall_seconds"],
        "scheme": {"kind": "int8/int4: symmetric round-to-nearest (expunge_ml.quantization); nf4: bitsandbytes "
                           "4-bit NormalFloat quantize/dequantize", "bits": [8, 4],
                   "group_size": opts.quant_group_size, "skipped": ["lm_head"],
                   "uld": "base and assistant (LoRA merged) both quantized; composite recomputed"},
        "tofu_config": tofu["config"],
        "sizes": tofu["sizes"],
        "environment": tofu["environment"],
        "goal": goal(rows),
        "rows": rows,
    }
    write_outputs(report, Path(out_dir))
    return report


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    cfg = report["tofu_config"]
    lines = [
        "# Quantization attack on the TOFU benchmark model",
        "",
        "Generated by `benchmarks/quantization.py` from a real run; every number comes from "
        "`benchmarks/results/quantization.json`.",
        "",
        f"Command: `{report['command']}`  ",
        f"Started {report['started_at']}, wall time {report['wall_seconds']:.0f} s "
        f"(torch {report['environment']['torch']}, {report['environment']['threads']} threads).",
        "",
        f"Model and settings: the TOFU benchmark's (Llama {cfg['num_layers']} layers × hidden {cfg['hidden_size']}, "
        f"vocab {report['sizes']['vocab_size']}, {report['sizes']['base_parameters']:,} parameters; "
        f"authors {report['sizes']['authors']}); GA/NPO/ULD with the settings of `tofu.json`. "
        f"Quantization: {report['scheme']['kind']}, group size {report['scheme']['group_size']}, "
        f"LM head kept in fp32; {report['scheme']['uld']}.",
        "",
        "recovery = (forget ROUGE-L after quantization − after unlearning) ÷ (base − after unlearning), clipped "
        "to [0, 1]; `recovery_prob` the same on the answer probability; kept = forget ROUGE-L ÷ the fp32 base's; "
        "n/a where unlearning removed < 0.05 ROUGE-L (nothing to recover).",
        "",
        "| split | method | precision | forget ROUGE-L | forget P(answer) | kept | recovery | recovery (prob) "
        "| forget quality | model utility |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['split']} | {r['method']} | {r['precision']} | {r['forget_rougeL']:.3f} | {r['forget_prob']:.3f} "
            f"| {_fmt(r['kept'])} | {_fmt(r['recovery'])} | {_fmt(r['recovery_prob'])} "
            f"| {r['forget_quality']:.3g} | {r['model_utility']:.4f} |")
    g = report["goal"]
    lines += ["", f"Goal (ULD recovery ≤ {RECOVERY_GOAL:.0%} at every quantized precision): "
              f"{'met' if g['met'] else 'NOT met'} — " + ", ".join(f"{k}: {'yes' if v else 'no'}"
                                                             for k, v in g["uld_recovery_le_0.05"].items())]
    if report.get("notes"):
        lines += ["", "## Notes", "", report["notes"].strip()]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "quantization.json", "md": out_dir / "quantization.md"}
    paths["json"].write_text(json.dumps(report, indent=2, default=float))
    paths["md"].write_text(markdown(report))
    return paths


def print_table(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="Quantization attack (recovery = share of forgotten ROUGE-L that comes back)")
    for col in ("split", "method", "precision", "forget ROUGE-L", "forget P", "recovery", "utility"):
        table.add_column(col, justify="left" if col in ("split", "method", "precision") else "right")
    for r in report["rows"]:
        table.add_row(r["split"], r["method"], r["precision"], f"{r['forget_rougeL']:.3f}", f"{r['forget_prob']:.3f}",
                      _fmt(r["recovery"]), f"{r['model_utility']:.4f}")
    console.print(table)
    console.print(f"goal ULD recovery ≤ {RECOVERY_GOAL:.0%}: {'MET' if report['goal']['met'] else 'NOT met'} "
                  f"{report['goal']['uld_recovery_le_0.05']}")
