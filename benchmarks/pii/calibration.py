"""The row "uld calibrated": w chosen per erasure by the pipeline's relative rule on its training questions."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

from .data import qa_records
from .measure import make_row, measure, quantized_leaks
from .options import PIIBenchOptions


def calibration_probes(rows: Sequence[Mapping[str, Any]], question_wordings: Mapping[str, Sequence[str]] | None):
    """PII probes from what an erasure trains on: each row's training question, with its LM-written wordings
    standing where an evaluation's paraphrased questions would; no inverted question. The pipeline's
    `training_question_probes` on the rows' identifiers, so w is scored as the pipeline scores it."""
    from expunge_ml.weight_selection import training_question_probes

    return training_question_probes(qa_records(rows, "row"), question_wordings)


def check_calibration(options: PIIBenchOptions) -> None:
    """Fail before any training when the candidates cannot serve the relative rule."""
    from expunge_ml.weight_selection import check_candidates

    if options.uld_calibrate_weights and "uld" in options.methods:
        try:
            check_candidates(options.uld_calibrate_weights, options.uld.weight)
        except ValueError as exc:
            raise ValueError(f"uld_calibrate_weights with uld.weight {options.uld.weight:g}: {exc}") from exc


def measured_row(source, label: str, method: str, split: str, split_probes, base_retained, counts: tuple[int, int],
                 extra: Mapping[str, Any], tokenizer, fmt, options: PIIBenchOptions,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """Measure `source` on the evaluation probes as a row named `method`, and log it under `label`."""
    measured = measure(source, tokenizer, fmt, split_probes, options)
    row = make_row(split, method, measured["erased"], measured["retained"], base_retained, *counts, extra)
    log(f"  {label} → erased leak {row['erased_leak_rate']:.4f}, retained ratio "
        f"{row['retained_pii_recall_ratio'] or 0:.4f}")
    return row


def calibrated_row(source, base, tokenizer, fmt, split: str, forget_rows, retain_rows, question_wordings,
                   split_probes, base_retained, counts: tuple[int, int], options: PIIBenchOptions,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """Score each candidate w on the erasure's own training questions (`calibration_probes`), serve the one the
    relative rule picks, and measure that composite on the evaluation probes like any other row."""
    from expunge_ml.logits import CausalLMLogits
    from expunge_ml.methods.uld import ensemble_weights
    from expunge_ml.weight_selection import choose_weight_relative, score_weights

    def composite_at(weight: float):
        return dataclasses.replace(source, weights=ensemble_weights(weight, len(source.assistants)))

    t0 = time.perf_counter()
    scores = score_weights(
        CausalLMLogits(base), composite_at, tokenizer, fmt, calibration_probes(forget_rows, question_wordings),
        calibration_probes(retain_rows, question_wordings), options.uld_calibrate_weights, options.max_new_tokens,
        options.eval_batch_size)
    chosen = choose_weight_relative(scores, options.uld.weight, options.uld_calibrate_min_retained)
    log(f"  calibration (w, erased identifiers stated, retained ratio on training questions): {scores} → w {chosen:g}")
    served = composite_at(chosen)
    row = measured_row(served, f"calibrated w {chosen:g}", "uld calibrated", split, split_probes, base_retained,
                       counts, {"weight": chosen, "calibration": [list(s) for s in scores]},
                       tokenizer, fmt, options, log)
    row["calibration_seconds"] = round(time.perf_counter() - t0, 1)  # the served composite's measurement included
    row["quantized"] = quantized_leaks(served, tokenizer, fmt, split_probes["erased"], options, log)
    return row
