"""One benchmark run: the base, each split's erasures by each method, the result dict."""
from __future__ import annotations

import dataclasses
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .base import base_dir, measure_base, measure_key, train_or_load_base
from .calibration import calibrated_row, check_calibration
from .data import group_rows, load_data, retain_training_groups, split_groups, validation_erasures
from .measure import check_quant_attacks, make_row, measure, quantized_leaks, sum_reports
from .methods import load_question_wordings, run_method
from .options import DEFAULT_DATA_DIR, GOAL_MAX_ERASED_LEAK, GOAL_MIN_RETAINED_RATIO, KINDS, PIIBenchOptions


def _log_default(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def current_command() -> str:
    """How this process was started, as a copy-pasteable command line."""
    argv = list(sys.argv)
    if "pii" in argv[1:] and "benchmarks/pii" not in argv[0]:  # mounted: `expunge benchmark pii ...`
        return "expunge benchmark " + " ".join(shlex.quote(a) for a in argv[argv.index("pii", 1):])
    if argv and "benchmarks/pii" in argv[0]:
        return " ".join(["python -m benchmarks.pii", *(shlex.quote(a) for a in argv[1:])])
    return "benchmarks.pii.main(...)"


@dataclass
class Prepared:
    """What every split of a run shares: the base, the rows by group, their probes and the base's report."""
    base: Any
    tokenizer: Any
    fmt: Any
    base_report: dict[str, Any]
    rows_by_group: dict[str, list[dict]]
    probes: dict[str, list]
    base_by_group: dict[str, Any]
    base_eval_seconds: float
    reported_groups: set[str]
    split_people: dict[str, list[str]]
    run_splits: list[str]
    question_wordings: dict[str, list[str]] | None


def prepare(options: PIIBenchOptions, log: Callable[[str], None]) -> Prepared:
    from expunge_ml.logits import CausalLMLogits
    from expunge_ml.pii import records_from_unlearn_pii
    from expunge_ml.prompting import PromptFormat

    data = load_data(options)
    fmt = PromptFormat()
    base, tokenizer, base_report = train_or_load_base(options, data, log)
    base.requires_grad_(False)
    rows_by_group = group_rows(data)
    run_splits = list(options.splits)
    if options.validation_people:
        run_splits = validation_erasures(rows_by_group, data.split_people, options)
    probes = {g: records_from_unlearn_pii(rs) for g, rs in rows_by_group.items()}
    measured_file = f"measured-{measure_key(rows_by_group, options, base.device.type)}.json"
    base_by_group, base_eval_seconds = measure_base(
        lambda: measure(CausalLMLogits(base), tokenizer, fmt, probes, options),
        base_dir(options, base_report["key"]) / measured_file, log)
    base_report["memorisation"] = {g: {k: r[k]["leak_rate"] for k in KINDS} for g, r in base_by_group.items()}
    base_report["eval_seconds"] = round(base_eval_seconds, 2)
    log("base recall by group: " + json.dumps(base_report["memorisation"]))
    wordings = load_question_wordings(data, options, log) if options.writes_question_wordings else None
    return Prepared(base, tokenizer, fmt, base_report, rows_by_group, probes, base_by_group, base_eval_seconds,
                    data.reported_groups, data.split_people, run_splits, wordings)


def split_rows(split: str, p: Prepared, options: PIIBenchOptions, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The base row and each method's rows (ULD also its calibrated row) for one erasure."""
    from expunge_ml.logits import CausalLMLogits

    erased_people = set(p.split_people[split])
    erased_groups, retained_groups = split_groups(split, p.rows_by_group, erased_people, p.reported_groups)
    forget_rows = [r for g in erased_groups for r in p.rows_by_group[g]]
    kept_groups = retain_training_groups(split, erased_groups, retained_groups, p.rows_by_group,
                                         p.reported_groups, options)
    retain_rows = [r for g in kept_groups for r in p.rows_by_group[g]]
    counts = (len(erased_people), len({r["subject"] for g in retained_groups for r in p.rows_by_group[g]}))
    base_retained = sum_reports(p.base_by_group[g] for g in retained_groups)
    split_probes = {"erased": [x for g in erased_groups for x in p.probes[g]],
                    "retained": [x for g in retained_groups for x in p.probes[g]]}
    # What quantization alone does to the base's memory of the erased people: the scale the methods' rows
    # under the same attack compare with.
    rows = [make_row(split, "base", sum_reports(p.base_by_group[g] for g in erased_groups), base_retained,
                     base_retained, *counts,
                     {"eval_seconds": round(p.base_eval_seconds, 2),
                      "quantized": quantized_leaks(CausalLMLogits(p.base), p.tokenizer, p.fmt,
                                                   split_probes["erased"], options, log)})]
    for method in options.methods:
        log(f"{split}: {method} — erasing {counts[0]} people ({len(forget_rows)} QA), retaining "
            f"{len({r['subject'] for r in retain_rows})} ({len(retain_rows)} QA; {counts[1]} of them measured)")
        source, report = run_method(method, p.base, p.tokenizer, p.fmt, forget_rows, retain_rows, options, log, split,
                                    p.question_wordings)
        t0 = time.perf_counter()
        measured = measure(source, p.tokenizer, p.fmt, split_probes, options)
        report["eval_seconds"] = round(time.perf_counter() - t0, 2)
        row = make_row(split, method, measured["erased"], measured["retained"], base_retained, *counts, report)
        log(f"  → erased leak {row['erased_leak_rate']:.4f} ("
            + "/".join(f"{row[k]['erased_leak_rate']:.3f}" for k in KINDS) + "), retained ratio "
            f"{row['retained_pii_recall_ratio'] or 0:.4f} ("
            + "/".join(f"{row[k]['retained_recall_ratio'] or 0:.3f}" for k in KINDS) + ") [direct/paraphrased/inverted]")
        row["quantized"] = quantized_leaks(source, p.tokenizer, p.fmt, split_probes["erased"], options, log)
        rows.append(row)
        if method == "uld" and options.uld_calibrate_weights:
            rows.append(calibrated_row(source, p.base, p.tokenizer, p.fmt, split, forget_rows, retain_rows,
                                       p.question_wordings, split_probes, base_retained, counts, options, log))
    return rows


def report_config(options: PIIBenchOptions, base_report: dict[str, Any]) -> dict[str, Any]:
    """The options as the report records them (the shape `--config` reads), without this machine's paths."""
    import yaml

    from ..run_config import as_yaml

    config = yaml.safe_load(as_yaml(options))
    config.pop("cache_dir", None)
    config.pop("out_dir", None)
    if Path(options.data_dir) == DEFAULT_DATA_DIR:
        config["data_dir"] = "../shared/datasets/unlearn_pii"
    config["trained_people"] = base_report.get("n_people")
    config["base_training_pairs"] = base_report.get("n_pairs")
    return config


def run_benchmark(options: PIIBenchOptions, log: Callable[[str], None] = _log_default,
                  command: str | None = None) -> dict[str, Any]:
    """Train/load the base, erase each split with each method, measure; returns the result dict."""
    check_quant_attacks(options.quant_attacks)  # settings that cannot run fail now, not after the training
    check_calibration(options)
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    random.seed(options.seed)
    started = time.perf_counter()
    prepared = prepare(options, log)
    rows = [row for split in prepared.run_splits for row in split_rows(split, prepared, options, log)]
    return {
        "command": command or current_command(),
        "benchmark": "UnlearnPII",
        "goals": {"max_erased_leak_rate": GOAL_MAX_ERASED_LEAK,
                  "min_retained_pii_recall_ratio": GOAL_MIN_RETAINED_RATIO},
        "config": report_config(options, prepared.base_report),
        "base": prepared.base_report,
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def main(options: PIIBenchOptions | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the benchmark, print the table and (unless out_dir is None) write pii.json + pii.md."""
    from .report import print_table, write_outputs

    options = dataclasses.replace(options or PIIBenchOptions(), **overrides)
    result = run_benchmark(options)
    print_table(result)
    if options.out_dir is not None:
        paths = write_outputs(result, options.out_dir, options)
        print(f"wrote {', '.join(str(p) for p in paths)}")
    return result
