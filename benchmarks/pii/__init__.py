"""UnlearnPII benchmark: memorise people's PII, erase some of them, measure leakage and retained recall.

Source data: UnlearnPII (pariidanDKE/Toward-Practical-PII-Unlearning, data/PII), read from
`../shared/datasets/unlearn_pii/` beside the checkout (never copied into the repository).

Protocol (`benchmarks/results/pii.md` holds the numbers of a run):

1. **Base.** A small Llama (`expunge_ml.modeling.build_small_llama`, its own BPE tokenizer) is trained
   from scratch on every *trained person*: the first `n_people` people of `forget10_names.json` (the
   forget splits' people always included) plus the people of `test_retain_pii_sample.json`. Per QA row it
   sees the direct pair, `base_paraphrases` paraphrased pairs and the inverted pair, so that its
   paraphrased and inverted probes have something to leak. The base is cached by a hash of its settings
   and the data files, with its PII recall on every probe (the base row).
2. **Erase.** For each split (`forget1` = 2 people, `forget5` = 10 people) the split's people are the
   forget set and the other trained people the retain set. ULD trains the pipeline's `ULDConfig` (the
   options' `uld`) on `expunge_ml.uld_data.training_pairs`, the recipe the pipeline uses, with the rows as
   `QARecord`s (question, answer, subject, identifiers, first paraphrased answer) and the question wordings
   a local LM writes from the training questions; it is served at the fixed `uld.weight` (row "uld") and
   at the w the pipeline's relative rule picks on the erasure's own training questions (row "uld
   calibrated"). GA and NPO (baselines) get the forget/retain QA records. No method sees an evaluation
   prompt (paraphrased or inverted question). Settings are chosen on *validation erasures*
   (`validation_people`): people in no reported split, checked against everyone outside the reported splits.
3. **Measure** with `expunge_ml.pii.pii_leakage` (greedy answers): per prompt kind direct / paraphrased /
   inverted, the erased people's leak rate (normalised PII hits / identifiers; for inverted, the name) and
   the retained people's PII recall as a ratio to the base's; optionally again on quantized copies of each
   served model (`quant_attacks`).

Settings: `PIIBenchOptions`, from a preset (`PRESETS`: `scratch`, the default, and `smollm2`, which
fine-tunes SmolLM2-135M-Instruct on one wording per fact; its report is `benchmarks/results/pii_smollm2/`),
a YAML file (`--config`, read by `benchmarks.run_config`) and a few flags.
"""
from .base import base_dir, measure_base, measure_key, train_or_load_base
from .calibration import calibrated_row, calibration_probes
from .command import command_options, pii_app, pii_command
from .data import (PIIData, base_training_pairs, data_available, group_rows, load_data, qa_records,
                   retain_training_groups, row_pii, split_groups, validation_erasures)
from .measure import make_row, measure, quantized_leaks, sum_reports
from .methods import PARAPHRASER_SETTINGS, load_question_wordings, run_method, uld_training_data
from .options import (DEFAULT_CACHE_DIR, DEFAULT_DATA_DIR, DEFAULT_OUT_DIR, DEFAULT_ULD, KINDS, PRESETS,
                      QUANT_ATTACKS, SMOKE_SETTINGS, SMOLLM2_DIR, PIIBenchOptions, per_split, preset_options,
                      smoke_options)
from .report import markdown, merge_reports, write_outputs
from .run import main, run_benchmark

__all__ = [
    "DEFAULT_CACHE_DIR", "DEFAULT_DATA_DIR", "DEFAULT_OUT_DIR", "DEFAULT_ULD", "KINDS", "PARAPHRASER_SETTINGS",
    "PRESETS", "QUANT_ATTACKS", "SMOKE_SETTINGS", "SMOLLM2_DIR", "PIIBenchOptions", "PIIData", "base_dir",
    "base_training_pairs", "calibrated_row", "calibration_probes", "command_options", "data_available",
    "group_rows", "load_data", "load_question_wordings", "main", "make_row", "markdown", "measure",
    "measure_base", "measure_key", "merge_reports", "per_split", "pii_app", "pii_command", "preset_options",
    "qa_records", "quantized_leaks", "retain_training_groups", "row_pii", "run_benchmark", "run_method",
    "smoke_options", "split_groups", "sum_reports", "train_or_load_base", "uld_training_data",
    "validation_erasures", "write_outputs",
]
