"""`expunge benchmark tofu`: the TOFU protocol (Maini et al. 2024) for ULD and the baselines.

Protocol (scaled down to what a CPU can do, shape kept):
1. a base model is trained on the benchmark's authors (the forget authors of the largest requested split
   + some retain authors), plus — standing in for the pre-training a real LLM has — the real_authors /
   world_facts questions with their short answers (TOFU's base already knows those);
2. per split, a retain-only oracle is trained the same way without the split's forget authors;
3. per split and method, the base is unlearned (baselines: the model is fine-tuned; ULD: an assistant is
   trained and the served model is the logit difference), timed, and its peak memory measured;
4. every model (base, oracle, unlearned) is evaluated: forget truth ratios → forget quality (KS p-value
   against the oracle's), forget ROUGE-L, and the 9 TOFU utility numbers → model utility.

Trained bases and oracles are cached by a hash of everything that determines them.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import random
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from expunge_ml.corpus import QARecord
from expunge_ml.tofu import (
    FORGET_SPLITS,
    TofuData,
    forget_authors,
    load_tofu,
    option_probability,
    utility_keys,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "datasets" / "tofu"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "expunge-bench"
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"
ALL_METHODS = ("uld", "ga", "graddiff", "kl", "npo", "simnpo", "idkdpo", "rmu", "whp")
CACHE_VERSION = 1
MEMORY_METHOD = (
    "peak resident-set-size increase over the RSS at the start of the step, sampled every 5 ms from "
    "/proc/self/statm by a background thread (torch allocates outside Python's allocator, so tracemalloc "
    "would miss it, and getrusage's ru_maxrss is a process-lifetime high-water mark)"
)
CUDA_MEMORY_METHOD = (
    "peak CUDA memory allocated by torch during the step over what was allocated at its start "
    "(torch.cuda.max_memory_allocated after reset_peak_memory_stats); host memory is not counted"
)


@dataclass
class TofuBenchOptions:
    data_dir: str = str(DEFAULT_DATA_DIR)
    cache_dir: str = str(DEFAULT_CACHE_DIR)
    out_dir: str = str(DEFAULT_OUT_DIR)
    splits: tuple[str, ...] = ("forget01", "forget05")
    methods: tuple[str, ...] = ALL_METHODS
    # Authors: the forget authors of the largest split (or fewer, the *last* n of them) + retain authors
    # taken from those retain_perturbed covers (so the retain utility numbers are about trained authors).
    n_forget_authors: int | None = None  # None: all authors of the largest requested split
    author_pool: str | None = None  # train the authors of this split (default: the largest requested one)
    n_retain_authors: int = 5
    qa_per_author: int | None = None  # None: all 20 QA of each author; n: only the first n (smoke runs)
    world_knowledge: bool = True  # "pre-train" base and oracles on real_authors/world_facts (Q → short answer)
    real_max: int | None = 50  # cap on real_authors questions (eval and pre-training); None: all 100
    world_max: int | None = 50  # cap on world_facts questions; None: all 117
    retain_eval_max: int | None = 30  # cap on retain_perturbed rows evaluated; None: all of the chosen authors
    # Base / oracle model. With `pretrained` (a local HF causal-LM directory or a hub id), base, oracles and
    # retrain rows are that model fine-tuned (all weights) on their QA, as in the TOFU paper, with its own
    # tokenizer; the shape and vocab options below are then unused and the init is the same for every seed
    # (a retrain seed changes only the data order).
    pretrained: str | None = None
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    max_length: int = 128
    base_epochs: int = 40
    base_lr: float = 3e-3
    base_batch_size: int = 16
    base_target_loss: float = 0.05
    # Baselines (shared loop settings; per-method overrides in method_overrides)
    baseline_epochs: int = 5
    baseline_lr: float = 1e-4
    baseline_batch_size: int = 8
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # ULD
    uld_layers: int = 2  # K
    uld_weight: float = -0.8  # w
    uld_relative_top: float = 0.01  # τ
    uld_epochs: int = 20
    uld_lr: float = 1e-3
    uld_batch_size: int = 8
    uld_retain_weight: float = 5.0
    uld_target_forget_loss: float = 0.05
    uld_lora_r: int = 16
    uld_lora_alpha: int = 32
    uld_lora_dropout: float = 0.05
    # generated: typo'd questions per item; eval_text: (q, paraphrased a) [+ (paraphrased q, a)]
    uld_paraphrase_pairs: int = 0
    uld_perturbed_per_item: int = 2  # retain⁺ = retain rows + this many near-miss answers per forget item
    uld_retain_rows: float = 1.0  # retain rows in retain⁺ = this × |forget|
    uld_lr_schedule: str = "constant"
    # Where forget⁺ / retain⁺ come from. "generated" (expunge_ml/augment.py): other question wordings + the
    # answer, and near-miss answers with one fact swapped for another author's. "eval_text": TOFU's own
    # paraphrased / perturbed answers — the texts the truth ratio is computed on (kept to reproduce the
    # earlier runs; it trains on evaluation text).
    uld_augmentation: str = "generated"
    uld_fact_pairs: bool = True  # generated only: also (question, fact span) to remember / (question, other span) uniform
    # generated only: remember only the fact spans of the forget answers (names, places, titles, numbers); their
    # other tokens get α·NLL + (1 − α)·λ·KL(U ‖ p), α = uld_template_nll_weight. The truth ratio compares answers
    # that differ in their facts and share their wording, so an assistant sharp on the wording too distorts both.
    uld_fact_span_loss: bool = False
    uld_template_nll_weight: float = 0.0
    # Choose w per split with expunge_ml.calibration (forget records vs never-trained held-out authors' records,
    # no evaluation text, no oracle) instead of the fixed uld_weight; the grid searched is its default.
    uld_auto_weight: bool = False
    holdout_authors: int = 10  # never-trained TOFU authors whose QA are the calibration's held-out records
    # Evaluation
    max_new_tokens: int = 56
    eval_batch_size: int = 32
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None: torch's default
    device: str = "auto"  # where models train and run: auto (a CUDA GPU if torch sees one) | cpu | cuda[:N]
    # Development split for choosing hyper-parameters without looking at the TOFU forget splits: forget these
    # *retain* authors instead (a dev oracle is trained without them); replaces the TOFU splits in the run.
    dev_authors: tuple[int, ...] = ()
    # Retraining's own noise floor: retrain-only models with these other init seeds, rows
    # "retrain(seed=k)", scored against the seed-`seed` oracle like every method (cached like the oracle).
    retrain_seeds: tuple[int, ...] = (1, 2)
    # Extra (w, τ) composites of the same trained assistant, evaluated as extra rows "uld(w=…,tau=…)" (sweeps)
    uld_sweep: tuple[tuple[float, float], ...] = ()
    # Quantization attack: re-evaluate these methods' served models after round-to-nearest at each bit width
    # (every served weight, ULD's base and merged assistant included); stored per row under "quantized".
    quant_bits: tuple[int, ...] = ()
    quant_group_size: int | None = 64
    quant_methods: tuple[str, ...] = ("base", "uld", "ga", "npo")
    quant_nf4: bool = False  # also bitsandbytes NF4 (block size 64, as QLoRA), row key "nf4"
    plot: bool = True
    write: bool = True  # write JSON / Markdown / PNG under out_dir
    quiet: bool = False

    def validate(self) -> None:
        unknown = [s for s in self.splits if s not in FORGET_SPLITS]
        if unknown or not self.splits:
            raise ValueError(f"unknown or no splits {unknown}; known: {', '.join(FORGET_SPLITS)}")
        bad = [m for m in self.methods if m not in ALL_METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; known: {', '.join(ALL_METHODS)}")
        if self.author_pool is not None and (
            self.author_pool not in FORGET_SPLITS
            or any(FORGET_SPLITS[s] > FORGET_SPLITS[self.author_pool] for s in self.splits)
        ):
            raise ValueError(f"author_pool {self.author_pool!r} must be a TOFU split at least as large as every split")
        if self.uld_layers < 1 or (self.pretrained is None and self.uld_layers > self.num_layers):
            raise ValueError(f"uld_layers must be in 1..{self.num_layers}")  # a pretrained model's depth: checked at build
        if self.uld_augmentation not in ("generated", "eval_text"):
            raise ValueError(f"uld_augmentation must be 'generated' or 'eval_text', got {self.uld_augmentation!r}")
        if self.uld_lr_schedule not in ("constant", "linear"):
            raise ValueError(f"uld_lr_schedule must be 'constant' or 'linear', got {self.uld_lr_schedule!r}")
        if self.seed in self.retrain_seeds or len(set(self.retrain_seeds)) != len(self.retrain_seeds):
            raise ValueError(f"retrain_seeds {list(self.retrain_seeds)} must be distinct and differ from seed {self.seed}"
                             " (that seed is the oracle itself)")
        from expunge_ml.quantization import SUPPORTED_BITS

        if any(b not in SUPPORTED_BITS for b in self.quant_bits):
            raise ValueError(f"quant_bits {list(self.quant_bits)}: each must be one of {SUPPORTED_BITS}")
        if self.quant_group_size is not None and self.quant_group_size < 1:
            raise ValueError("quant_group_size must be a positive int or None (one scale per output row)")


# ------------------------------------------------------------------------------------------- helpers


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: fall back to the high-water mark
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakRSS:
    """Context manager: peak RSS increase (MB) over the RSS at entry, sampled by a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak_mb = 0.0

    def __enter__(self) -> "PeakRSS":
        self._start = _rss_bytes()
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_mb = (self._peak - self._start) / 2**20


def peak_memory(device):
    """Peak memory of a step where it matters: GPU memory on CUDA, the process's RSS on the CPU."""
    from expunge_ml.devices import PeakDeviceMemory

    return PeakDeviceMemory(device) if device.type == "cuda" else PeakRSS()


@dataclass
class Plan:
    """Which records the benchmark uses (derived from options + data; pure)."""

    authors: list[int]
    forget_authors: dict[str, list[int]]  # split -> authors
    retain_authors: list[int]
    base_pairs: list[tuple[str, str]]
    world_pairs: list[tuple[str, str]]
    real_eval: list[QARecord]
    world_eval: list[QARecord]
    retain_eval: list[QARecord]
    kept_ids: set[str] = field(default_factory=set)  # the author QA rows in use
    holdout: list[QARecord] = field(default_factory=list)  # QA of authors no model here is trained on

    def records(self, data: TofuData, authors) -> list[QARecord]:
        return [r for r in data.author_records(authors) if r.record_id in self.kept_ids]


def make_plan(data: TofuData, opts: TofuBenchOptions) -> Plan:
    largest = opts.author_pool or max(opts.splits, key=lambda s: FORGET_SPLITS[s])
    pool = forget_authors(largest)
    n_forget = len(pool) if opts.n_forget_authors is None else max(1, min(opts.n_forget_authors, len(pool)))
    chosen_forget = pool[len(pool) - n_forget:]
    per_split = {}
    for split in opts.splits:
        wanted = [a for a in forget_authors(split) if a in chosen_forget]
        if not wanted:
            raise ValueError(f"{split}: none of its authors is among the {n_forget} chosen forget authors")
        per_split[split] = wanted
    covered = [a for a in data.retain_perturbed_authors() if a not in chosen_forget]
    retain_authors = sorted(covered[: opts.n_retain_authors])
    if len(retain_authors) < opts.n_retain_authors:  # more than retain_perturbed covers: take the next ones
        extra = [a for a in range(200) if a not in retain_authors and a not in forget_authors("forget10")]
        retain_authors = sorted(retain_authors + extra[: opts.n_retain_authors - len(retain_authors)])
    authors = sorted(retain_authors + chosen_forget)
    def within_qa_cap(records: list[QARecord]) -> list[QARecord]:  # only the first qa_per_author QA of each author
        if opts.qa_per_author is None:
            return records
        return [r for r in records if int(r.record_id.split("-")[1]) % 20 < opts.qa_per_author]

    keep = within_qa_cap(data.author_records(authors))
    kept_ids = {r.record_id for r in keep}
    real_eval = data.real_authors[: opts.real_max] if opts.real_max is not None else list(data.real_authors)
    world_eval = data.world_facts[: opts.world_max] if opts.world_max is not None else list(data.world_facts)
    world_pairs = [r.pair for r in real_eval + world_eval] if opts.world_knowledge else []
    base_pairs = [r.pair for r in keep] + world_pairs
    retain_eval = [r for r in data.retain_eval_records(retain_authors) if r.record_id in kept_ids]
    if opts.retain_eval_max is not None:
        retain_eval = retain_eval[: opts.retain_eval_max]
    # held-out authors: the next authors outside every forget split that no base, oracle or method trains on
    untrained = [a for a in range(200) if a not in authors and a not in forget_authors("forget10")]
    holdout = within_qa_cap(data.author_records(untrained[: opts.holdout_authors]))
    return Plan(authors, per_split, retain_authors, base_pairs, world_pairs, real_eval, world_eval, retain_eval,
                kept_ids, holdout)


# ------------------------------------------------------------------------------------ model cache


def _shape(opts: TofuBenchOptions):
    from expunge_ml.modeling import SmallLlamaShape

    return SmallLlamaShape(
        hidden_size=opts.hidden_size,
        intermediate_size=opts.intermediate_size,
        num_hidden_layers=opts.num_layers,
        num_attention_heads=opts.num_heads,
        max_position_embeddings=max(opts.max_length, 64) * 2,
    )


_IDENTITIES: dict[str, str] = {}


def pretrained_identity(location: str) -> str:
    """sha256 of a local model's weight files (so a cache entry never outlives the weights it was tuned
    from); a hub id stands for itself."""
    from expunge_ml.modeling import weights_fingerprint

    if location not in _IDENTITIES:
        _IDENTITIES[location] = weights_fingerprint(Path(location)) if Path(location).is_dir() else location
    return _IDENTITIES[location]


def _train_settings(opts: TofuBenchOptions) -> dict:
    return {
        "epochs": opts.base_epochs, "lr": opts.base_lr, "batch_size": opts.base_batch_size,
        "target_loss": opts.base_target_loss, "seed": opts.seed,
    }


def _load_or_train_tokenizer(opts, pairs: Sequence[tuple[str, str]], cache: Path, log: Callable[[str], None]):
    """The benchmark's BPE tokenizer fitted on `pairs` (cached by them), or a pre-trained model's own.
    `opts`: any benchmark options with `pretrained` and `vocab_size`."""
    from transformers import AutoTokenizer

    from expunge_ml.modeling import train_bpe_tokenizer

    if opts.pretrained:  # the model's own tokenizer; the key pins the exact weights it came with
        return AutoTokenizer.from_pretrained(opts.pretrained), _sha({"pretrained": pretrained_identity(opts.pretrained)})[:16]
    key = _sha({"v": CACHE_VERSION, "kind": "tokenizer", "vocab": opts.vocab_size, "pairs": list(pairs)})[:16]
    path = cache / f"tokenizer-{key}"
    if (path / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(path), key
    log(f"training BPE tokenizer (vocab {opts.vocab_size}) on the benchmark's training text")
    tokenizer = train_bpe_tokenizer((f"{q} {a}" for q, a in pairs), opts.vocab_size)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path), key


def _load_or_train_model(
    role: str, pairs: list[tuple[str, str]], tokenizer, tokenizer_key: str, opts,
    cache: Path, log: Callable[[str], None], device, prompt_template: str | None = None,
):
    """(model, meta): from the cache when the same tokenizer + shape + settings + pairs were trained before.
    `opts`: any benchmark options with the model fields of TofuBenchOptions (shape, base_*, seed,
    pretrained). `prompt_template`: how a pair is laid out for training (None: the QA frame)."""
    import torch
    from transformers import AutoModelForCausalLM

    from expunge_ml.modeling import build_small_llama, train_on_qa
    from expunge_ml.prompting import PromptFormat

    init = {"pretrained": pretrained_identity(opts.pretrained)} if opts.pretrained else asdict(_shape(opts))
    # The thread count and the device change the float summation order, hence the trained weights:
    # a model trained another way is another model, not a cache hit.
    build = {"threads": torch.get_num_threads(), "device": torch.device(device).type}
    # the QA frame's key is the key before templates existed, so TOFU's cached models stay valid
    template = {} if prompt_template is None else {"prompt_template": prompt_template}
    key = _sha({
        "v": CACHE_VERSION, "tokenizer": tokenizer_key, "shape": init,
        "train": _train_settings(opts), "pairs": pairs, "build": build, **template,
    })[:16]
    path = cache / f"model-{key}"
    meta_path = path / "bench_meta.json"
    if meta_path.exists():
        model = AutoModelForCausalLM.from_pretrained(path).to(device)
        model.eval()
        meta = json.loads(meta_path.read_text())
        meta["cached"] = True
        log(f"{role}: loaded from cache {path}")
        return model, meta
    log(f"{role}: training on {len(pairs)} pairs (cache key {key})")
    if opts.pretrained:
        model = AutoModelForCausalLM.from_pretrained(opts.pretrained, dtype=torch.float32).to(device)
    else:
        model = build_small_llama(tokenizer, _shape(opts), seed=opts.seed).to(device)
    settings = _train_settings(opts)

    def progress(epoch: int, loss: float) -> None:
        if epoch % 5 == 0 or epoch == 1:
            log(f"  {role} epoch {epoch}: loss {loss:.4f}")

    with peak_memory(device) as mem:
        fmt = PromptFormat() if prompt_template is None else PromptFormat(template=prompt_template)
        report = train_on_qa(model, tokenizer, fmt, pairs, progress=progress, **settings)
    meta = {
        "role": role, "key": key, "n_pairs": len(pairs), "epochs": report.epochs, "steps": report.steps,
        "final_loss": report.final_loss, "train_seconds": report.seconds, "peak_mem_mb": mem.peak_mb,
        "device": device.type, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    meta_path.write_text(json.dumps(meta, indent=2))
    meta["cached"] = False
    log(f"{role}: trained in {report.seconds:.0f}s ({report.epochs} epochs, final loss {report.final_loss:.4f})")
    return model, meta


# --------------------------------------------------------------------------------------- evaluation


def _scores(source, tokenizer, fmt, pairs, batch_size) -> list[float]:
    """Mean (per-token) log-prob of each answer given its question."""
    from expunge_ml.generation import score_answers

    return [s.mean_log_prob for s in score_answers(source, tokenizer, fmt, pairs, batch_size)]


def _rouge(source, tokenizer, fmt, records: Sequence[QARecord], opts: TofuBenchOptions) -> tuple[float, list[str]]:
    from expunge_ml.generation import greedy_generate
    from expunge_ml.metrics import rouge_l_recall

    outputs = greedy_generate(source, tokenizer, [fmt.prompt(r.question) for r in records],
                              opts.max_new_tokens, opts.eval_batch_size)
    return float(np.mean([rouge_l_recall(o, r.answer) for o, r in zip(outputs, records)])), outputs


def evaluate_source(source, tokenizer, fmt, forget: Sequence[QARecord], plan: Plan, opts: TofuBenchOptions,
                    utility_cache: dict | None = None) -> dict:
    """TOFU numbers of one logit source: forget truth ratios / ROUGE-L / prob, the 9 utility numbers."""
    from expunge_ml.metrics import forget_truth_ratio_score, harmonic_mean, retain_truth_ratio_score, truth_ratio

    out: dict[str, Any] = {}
    # forget set: answer, paraphrase and perturbed answers scored in one flat list
    pairs, spans = [], []
    for r in forget:
        start = len(pairs)
        pairs += [(r.question, r.answer), (r.question, r.paraphrased_answer)]
        pairs += [(r.question, p) for p in r.perturbed_answers]
        spans.append((start, len(pairs)))
    lp = _scores(source, tokenizer, fmt, pairs, opts.eval_batch_size)
    ratios = [truth_ratio(lp[s + 1], lp[s + 2:e]) for s, e in spans]
    out["forget_truth_ratios"] = ratios
    out["forget_truth_ratio_score"] = forget_truth_ratio_score(ratios)
    out["forget_prob"] = float(np.mean([np.exp(lp[s]) for s, _ in spans]))
    out["forget_rougeL"], _ = _rouge(source, tokenizer, fmt, forget, opts)
    if utility_cache is not None and "numbers" in utility_cache:
        out["utility"] = dict(utility_cache["numbers"])
    else:
        numbers: dict[str, float] = {}
        # retain: P(answer) (length-normalised), ROUGE-L recall, mean(max(0, 1 − R)) with paraphrased vs perturbed
        pairs, spans = [], []
        for r in plan.retain_eval:
            start = len(pairs)
            pairs += [(r.question, r.answer), (r.question, r.paraphrased_answer)]
            pairs += [(r.question, p) for p in r.perturbed_answers]
            spans.append((start, len(pairs)))
        lp = _scores(source, tokenizer, fmt, pairs, opts.eval_batch_size)
        numbers["retain_prob"] = float(np.mean([np.exp(lp[s]) for s, _ in spans]))
        numbers["retain_rougeL"], _ = _rouge(source, tokenizer, fmt, plan.retain_eval, opts)
        numbers["retain_truth_ratio"] = retain_truth_ratio_score([truth_ratio(lp[s + 1], lp[s + 2:e]) for s, e in spans])
        # real authors / world facts: P(correct) normalised over the options, ROUGE-L recall, 1 − R vs the answer
        for name, records in (("real_authors", plan.real_eval), ("world_facts", plan.world_eval)):
            pairs, spans = [], []
            for r in records:
                start = len(pairs)
                pairs += [(r.question, r.answer)] + [(r.question, p) for p in r.perturbed_answers]
                spans.append((start, len(pairs)))
            lp = _scores(source, tokenizer, fmt, pairs, opts.eval_batch_size)
            numbers[f"{name}_prob"] = float(np.mean([option_probability(lp[s], lp[s + 1:e]) for s, e in spans]))
            numbers[f"{name}_rougeL"], _ = _rouge(source, tokenizer, fmt, records, opts)
            numbers[f"{name}_truth_ratio"] = retain_truth_ratio_score([truth_ratio(lp[s], lp[s + 1:e]) for s, e in spans])
        out["utility"] = {k: numbers[k] for k in utility_keys()}
        if utility_cache is not None:
            utility_cache["numbers"] = dict(out["utility"])
    out["model_utility"] = harmonic_mean(list(out["utility"].values()))
    return out


# ------------------------------------------------------------------------------------------ methods


def uld_pairs(data: TofuData, forget: Sequence[QARecord], retain: Sequence[QARecord], opts: TofuBenchOptions,
              rng: random.Random) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """forget⁺ / retain⁺ with up to uld_retain_rows·|forget| sampled retain rows.

    "generated": the pipeline's own `training_pairs` (near-miss answers and wrong facts drawn from all the
    split's retain authors, (question, fact) pairs, uld_paraphrase_pairs typo'd questions per item).
    "eval_text": TOFU's paraphrased answer, (paraphrased question, answer) and uld_perturbed_per_item
    perturbed answers — the truth ratio's own texts; kept only to reproduce the earlier runs."""
    from expunge_ml.augment import with_fact_labels
    from expunge_ml.methods.uld import training_pairs

    n_retain = min(len(retain), int(round(opts.uld_retain_rows * len(forget))))
    retain_rows = rng.sample(list(retain), n_retain)
    if opts.uld_augmentation == "generated":
        forget_plus, retain_plus = training_pairs(forget, retain_rows, uld_config(opts), donor_records=retain)
        if opts.uld_fact_span_loss:
            forget_plus = with_fact_labels(forget_plus, [r.answer for r in forget])
        return forget_plus, retain_plus
    if opts.uld_fact_span_loss:
        raise ValueError("uld_fact_span_loss needs uld_augmentation='generated' (it labels the training answers' facts)")
    forget_plus = [r.pair for r in forget]
    if opts.uld_paraphrase_pairs >= 1:
        forget_plus += [(r.question, r.paraphrased_answer) for r in forget if r.paraphrased_answer]
    if opts.uld_paraphrase_pairs >= 2:
        forget_plus += [(data.paraphrased_questions[r.record_id], r.answer) for r in forget
                        if data.paraphrased_questions.get(r.record_id)]
    retain_plus = [r.pair for r in retain_rows]
    retain_plus += [(r.question, p) for r in forget for p in r.perturbed_answers[: opts.uld_perturbed_per_item]]
    return forget_plus, retain_plus


def uld_config(opts: TofuBenchOptions):
    from .uld_options import uld_config_from

    generated = opts.uld_augmentation == "generated"
    return uld_config_from(
        opts, epochs=opts.uld_epochs, target_forget_loss=opts.uld_target_forget_loss,
        augment_paraphrased=opts.uld_paraphrase_pairs > 0, augment_perturbed=opts.uld_perturbed_per_item > 0,
        augmentation="generated" if generated else "corpus", near_misses_per_item=opts.uld_perturbed_per_item,
        question_variants=opts.uld_paraphrase_pairs, fact_pairs=opts.uld_fact_pairs and generated,
        template_nll_weight=opts.uld_template_nll_weight,
    )


DEFAULT_METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    # RMU's c = 6.5 was tuned for Zephyr-7B activations: make it relative to this model's hidden norms.
    "rmu": {"steering_relative": True, "steering_coeff": 2.0},
}


def baseline_config(name: str, opts: TofuBenchOptions):
    from expunge_ml.methods.registry import make_config

    overrides: dict[str, Any] = {
        "epochs": opts.baseline_epochs, "lr": opts.baseline_lr, "batch_size": opts.baseline_batch_size,
        "max_length": opts.max_length, "seed": opts.seed,
    }
    overrides.update(DEFAULT_METHOD_OVERRIDES.get(name, {}))
    overrides.update(opts.method_overrides.get(name, {}))
    return make_config(name, overrides)


# -------------------------------------------------------------------------------------------- runner


def run_tofu_benchmark(opts: TofuBenchOptions, command: str = "", log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark; returns the report dict (and writes it + Markdown + plot when opts.write)."""
    import torch

    opts.validate()
    started = time.perf_counter()
    started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if log is None:
        log = (lambda _msg: None) if opts.quiet else (lambda msg: print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True))
    previous_threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        return _run(opts, command, log, started, started_at)
    finally:
        torch.set_num_threads(previous_threads)  # callers (e.g. a test session) keep their setting


def _run(opts: TofuBenchOptions, command: str, log: Callable[[str], None], started: float, started_at: str) -> dict:
    import torch

    from expunge_ml.calibration import calibrate_weight
    from expunge_ml.devices import resolve_device
    from expunge_ml.evidence import ServedModel
    from expunge_ml.logits import CausalLMLogits, CompositeLogits
    from expunge_ml.methods.registry import get_method
    from expunge_ml.methods.uld import build_assistant, train_assistant
    from expunge_ml.metrics import forget_quality
    from expunge_ml.prompting import PromptFormat

    device = resolve_device(opts.device)
    data = load_tofu(opts.data_dir)
    plan = make_plan(data, opts)
    fmt = PromptFormat()
    cache = Path(opts.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    log(f"authors: {len(plan.authors)} ({len(plan.retain_authors)} retain + forget {plan.forget_authors}); "
        f"base pairs {len(plan.base_pairs)} (world knowledge {len(plan.world_pairs)})")

    tokenizer, tok_key = _load_or_train_tokenizer(opts, plan.base_pairs, cache, log)
    log(f"device: {device}")
    base, base_meta = _load_or_train_model("base", plan.base_pairs, tokenizer, tok_key, opts, cache, log, device)
    base.requires_grad_(False)
    base_source = CausalLMLogits(base)
    rows: list[dict] = []
    rng = random.Random(opts.seed)
    base_utility: dict = {}

    def row(method: str, split: str, ev: dict, oracle_ratios: list[float], seconds: float, mem: float, **extra) -> dict:
        fq = forget_quality(ev["forget_truth_ratios"], oracle_ratios)
        r = {
            "method": method, "split": split, "forget_quality": fq, "model_utility": ev["model_utility"],
            "forget_rougeL": ev["forget_rougeL"], "forget_prob": ev["forget_prob"],
            "forget_truth_ratio_score": ev["forget_truth_ratio_score"],
            "forget_tr_rank_corr_oracle": rank_correlation(ev["forget_truth_ratios"], oracle_ratios),
            "train_seconds": seconds,
            "peak_mem_mb": mem, "utility": ev["utility"], **extra,
        }
        log(f"{split:9s} {method:14s} FQ {fq:.3g}  MU {ev['model_utility']:.4f}  forget ROUGE-L {ev['forget_rougeL']:.3f}"
            f"  train {seconds:.1f}s  mem {mem:.0f}MB")
        rows.append(r)
        if opts.write:  # partial results survive an interrupted run
            write_outputs(build_report(final=False), Path(opts.out_dir))
        return r

    def build_report(final: bool) -> dict:
        split_names = list(dict.fromkeys(r["split"] for r in rows))
        ratio = {}
        for split in split_names:
            by = {r["method"]: r for r in rows if r["split"] == split}
            if "uld" in by and "npo" in by and by["npo"]["train_seconds"] > 0:
                ratio[split] = by["uld"]["train_seconds"] / by["npo"]["train_seconds"]
        report = {
            "command": command,
            "config": asdict(opts),
            "started_at": started_at,
            "wall_seconds": time.perf_counter() - started,
            "complete": final,
            "sizes": {
                "authors": plan.authors, "retain_authors": plan.retain_authors, "forget_authors": plan.forget_authors,
                "base_train_pairs": len(plan.base_pairs), "world_knowledge_pairs": len(plan.world_pairs),
                "retain_eval": len(plan.retain_eval), "real_authors_eval": len(plan.real_eval),
                "world_facts_eval": len(plan.world_eval), "vocab_size": len(tokenizer),
                "base_parameters": int(sum(p.numel() for p in base.parameters())),
            },
            "base_training": base_meta,
            "memory_method": CUDA_MEMORY_METHOD if device.type == "cuda" else MEMORY_METHOD,
            "uld_npo_train_time_ratio": ratio,
            "acceptance": acceptance(rows, split_names),
            "environment": {
                "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(), "platform": platform.platform(), "device": device.type,
                "accelerator": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            },
            "rows": rows,
        }
        return report

    def quantization_attack(r: dict, served, forget, eval_plan, oracle_ratios) -> None:
        """Quantize every served weight (RTN at each bit width, NF4 if asked) and evaluate again (Zhang et al. 2024)."""
        if r["method"] not in opts.quant_methods:
            return
        for precision, group_size, build in served.quantization_attacks(opts.quant_bits, opts.quant_group_size, opts.quant_nf4):
            ev = evaluate_source(build().source(), tokenizer, fmt, forget, eval_plan, opts)
            r.setdefault("quantized", {})[precision] = {
                "forget_rougeL": ev["forget_rougeL"], "forget_prob": ev["forget_prob"],
                "forget_quality": forget_quality(ev["forget_truth_ratios"], oracle_ratios),
                "model_utility": ev["model_utility"], "group_size": group_size,
            }
            log(f"{r['split']:9s} {r['method']:14s} {precision}: forget ROUGE-L {ev['forget_rougeL']:.3f}"
                f"  P(answer) {ev['forget_prob']:.3f}  MU {ev['model_utility']:.4f}")

    specs = []  # (split, forget authors, oracle authors, retain authors for the methods, plan for evaluation)
    if opts.dev_authors:
        dev = list(opts.dev_authors)
        if any(a not in plan.retain_authors for a in dev) or len(dev) >= len(plan.retain_authors):
            raise ValueError(f"dev authors {dev} must be a proper subset of the retain authors {plan.retain_authors}")
        eval_plan = dataclasses.replace(
            plan, retain_eval=[r for r in plan.retain_eval if int(r.subject.split("-")[1]) not in dev])
        # the methods' retain set leaves out the TOFU forget authors, so tuning never touches them
        specs.append(("dev", dev, [a for a in plan.authors if a not in dev],
                      [a for a in plan.retain_authors if a not in dev], eval_plan))
    else:
        for split in opts.splits:
            others = [a for a in plan.authors if a not in plan.forget_authors[split]]
            specs.append((split, plan.forget_authors[split], others, others, plan))
    for split, split_forget_authors, oracle_authors, retain_authors, eval_plan in specs:
        forget = plan.records(data, split_forget_authors)
        # the retain side of this split: every benchmark author not forgotten in it
        retain = plan.records(data, retain_authors)
        oracle_pairs = [r.pair for r in plan.records(data, oracle_authors)] + plan.world_pairs
        oracle, oracle_meta = _load_or_train_model(f"retain_oracle[{split}]", oracle_pairs, tokenizer, tok_key,
                                                   opts, cache, log, device)
        oracle.requires_grad_(False)
        oracle_ev = evaluate_source(CausalLMLogits(oracle), tokenizer, fmt, forget, eval_plan, opts)
        oracle_ratios = oracle_ev["forget_truth_ratios"]
        row("retain_oracle", split, oracle_ev, oracle_ratios, oracle_meta["train_seconds"], oracle_meta["peak_mem_mb"],
            cached=oracle_meta.get("cached", False), epochs=oracle_meta["epochs"], steps=oracle_meta["steps"])
        del oracle
        # Retraining from another init seed is the ideal unlearner; its forget quality against the oracle
        # is the most any method can be expected to reach at this scale (the KS test also sees seed noise).
        for seed in opts.retrain_seeds:
            reseeded, meta = _load_or_train_model(f"retrain[{split}, seed {seed}]", oracle_pairs, tokenizer, tok_key,
                                                  dataclasses.replace(opts, seed=seed), cache, log, device)
            reseeded.requires_grad_(False)
            ev = evaluate_source(CausalLMLogits(reseeded), tokenizer, fmt, forget, eval_plan, opts)
            row(retrain_method(seed), split, ev, oracle_ratios, meta["train_seconds"], meta["peak_mem_mb"],
                cached=meta.get("cached", False), epochs=meta["epochs"], steps=meta["steps"])
            del reseeded
        base_ev = evaluate_source(base_source, tokenizer, fmt, forget, eval_plan, opts, base_utility)
        r = row("base", split, base_ev, oracle_ratios, base_meta["train_seconds"], base_meta["peak_mem_mb"],
                cached=base_meta.get("cached", False), epochs=base_meta["epochs"], steps=base_meta["steps"])
        quantization_attack(r, ServedModel(base), forget, eval_plan, oracle_ratios)
        for method in opts.methods:
            if method == "uld":
                config = uld_config(opts)
                forget_plus, retain_plus = uld_pairs(data, forget, retain, opts, rng)
                with peak_memory(device) as mem:
                    t0 = time.perf_counter()
                    assistant = build_assistant(base, config)
                    report = train_assistant(assistant, tokenizer, fmt, forget_plus, retain_plus, config,
                                              progress=lambda e, n, k: log(f"  uld epoch {e}: forget NLL {n:.3f} retain KL {k:.3f}"))
                    calibration = None
                    if opts.uld_auto_weight:  # part of the unlearning step, so inside its time and memory
                        calibration = calibrate_weight(
                            base_source, lambda w: CompositeLogits(base, [assistant], [w], relative_top=config.relative_top),
                            tokenizer, fmt, forget, plan.holdout, [r.answer for r in retain], seed=opts.seed,
                            batch_size=opts.eval_batch_size)
                        config = dataclasses.replace(config, weight=calibration.weight)
                        log(f"  uld calibrated w = {calibration.weight} (KS {calibration.ks_statistic:.3f} on "
                            f"{calibration.n_forget} forget vs {calibration.n_holdout} held-out records)")
                    seconds = time.perf_counter() - t0
                source = CompositeLogits(base, [assistant], [config.weight], relative_top=config.relative_top)
                ev = evaluate_source(source, tokenizer, fmt, forget, eval_plan, opts)
                r = row(method, split, ev, oracle_ratios, seconds, mem.peak_mb, epochs=report.epochs, steps=report.steps,
                        final_losses={"forget_nll": report.forget_nll, "retain_kl": report.retain_kl},
                        config=asdict(config), n_forget_plus=len(forget_plus), n_retain_plus=len(retain_plus),
                        weight_calibration=calibration.as_dict() if calibration else None)
                quantization_attack(r, ServedModel(base, [assistant], [config.weight], config.relative_top),
                                    forget, eval_plan, oracle_ratios)
                for w, tau in opts.uld_sweep:
                    variant = CompositeLogits(base, [assistant], [w], relative_top=tau)
                    ev = evaluate_source(variant, tokenizer, fmt, forget, eval_plan, opts)
                    row(f"uld(w={w},tau={tau})", split, ev, oracle_ratios, seconds, mem.peak_mb,
                        epochs=report.epochs, steps=report.steps)
                del assistant, source
            else:
                module = get_method(method)
                config = baseline_config(method, opts)
                with peak_memory(device) as mem:
                    t0 = time.perf_counter()
                    model = copy.deepcopy(base)
                    model.requires_grad_(True)
                    try:
                        report = module.unlearn(model, tokenizer, fmt, forget, retain, config,
                                                idk_answers=data.idk_answers or None,
                                                progress=lambda e, parts: log(f"  {method} epoch {e}: "
                                                    + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())))
                        error = None
                    except FloatingPointError as exc:  # a diverging baseline is a result, not a crash
                        report, error = None, str(exc)
                    seconds = time.perf_counter() - t0
                model.requires_grad_(False)
                ev = evaluate_source(CausalLMLogits(model), tokenizer, fmt, forget, eval_plan, opts)
                r = row(method, split, ev, oracle_ratios, seconds, mem.peak_mb,
                        epochs=report.epochs if report else None, steps=report.steps if report else None,
                        final_losses=report.final_losses if report else None, error=error,
                        config=dataclasses.asdict(config))
                quantization_attack(r, ServedModel(model), forget, eval_plan, oracle_ratios)
                del model

    report = build_report(final=True)
    if opts.write:
        write_outputs(report, Path(opts.out_dir))
    return report


def retrain_method(seed: int) -> str:
    return f"retrain(seed={seed})"


def is_retrain(method: str) -> bool:
    return method.startswith("retrain(seed=")


def _rho_text(row: dict) -> str:
    rho = row.get("forget_tr_rank_corr_oracle")
    return "—" if rho is None else f"{rho:.2f}"


def rank_correlation(ratios: Sequence[float], oracle_ratios: Sequence[float]) -> float | None:
    """Spearman ρ of a model's per-question forget truth ratios with the oracle's (same questions, same order).

    Forget quality (KS) compares only the two distributions; ρ says whether a method forgets the way
    retraining does, question by question (re-seeded retraining reaches ρ ≈ 0.8 at the committed scale)."""
    from scipy.stats import spearmanr

    if len(ratios) != len(oracle_ratios) or len(ratios) < 3 or len(set(ratios)) < 2 or len(set(oracle_ratios)) < 2:
        return None  # too few questions, or a constant side: no ranking to correlate
    rho = spearmanr(ratios, oracle_ratios).statistic
    return None if not np.isfinite(rho) else float(rho)


def acceptance(rows: list[dict], splits: Sequence[str]) -> dict:
    """The issue's acceptance per split: ULD FQ ≥ 0.9, MU ≥ 0.98·base MU, and better than GA/GradDiff/NPO on both."""
    out = {}
    for split in splits:
        by = {r["method"]: r for r in rows if r["split"] == split}
        if "uld" not in by or "base" not in by:
            continue
        uld, base = by["uld"], by["base"]
        checks = {
            "uld_forget_quality_ge_0.9": uld["forget_quality"] >= 0.9,
            "uld_utility_ge_0.98_base": uld["model_utility"] >= 0.98 * base["model_utility"],
        }
        for other in ("ga", "graddiff", "npo"):
            if other in by:
                checks[f"uld_beats_{other}"] = (uld["forget_quality"] > by[other]["forget_quality"]
                                                and uld["model_utility"] > by[other]["model_utility"])
        # what retraining itself scores against the oracle: the metric's own ceiling at this scale (context only)
        retrain = {r["method"]: r["forget_quality"] for r in by.values() if is_retrain(r["method"])}
        out[split] = {"checks": checks, "met": all(checks.values()), "retrain_forget_quality": retrain}
    return out


# ------------------------------------------------------------------------------------------ outputs


def print_table(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="TOFU benchmark (forget quality = KS p-value vs retain oracle)")
    for col in ("split", "method", "forget quality", "model utility", "forget ROUGE-L", "forget-TR ρ", "train s", "peak MB"):
        table.add_column(col, justify="left" if col in ("split", "method") else "right")
    for r in report["rows"]:
        table.add_row(r["split"], r["method"], f"{r['forget_quality']:.3g}", f"{r['model_utility']:.4f}",
                      f"{r['forget_rougeL']:.3f}", _rho_text(r), f"{r['train_seconds']:.1f}", f"{r['peak_mem_mb']:.0f}")
    console.print(table)
    for split, value in report.get("uld_npo_train_time_ratio", {}).items():
        console.print(f"{split}: ULD assistant training time / NPO training time = {value:.2f}")
    for split, acc in report.get("acceptance", {}).items():
        console.print(f"{split}: acceptance {'MET' if acc['met'] else 'NOT met'} {acc['checks']}")


def _uld_augmentation_text(cfg: dict) -> str:
    retain_rows = f"{cfg['uld_retain_rows']}×|forget| retain rows"
    if cfg.get("uld_augmentation", "eval_text") == "eval_text":  # runs before the option existed used eval text
        return (f"forget⁺ = forget QA + {cfg['uld_paraphrase_pairs']} paraphrased pairs per item, retain⁺ = "
                f"{retain_rows} + {cfg['uld_perturbed_per_item']} perturbed answers per forget item "
                "(TOFU's own paraphrased / perturbed answers: the truth ratio's texts)")
    forget = ["forget QA"]
    retain = [retain_rows]
    if cfg.get("uld_fact_pairs"):
        forget.append("(question, fact span) per fact of the answer")
        retain.append("(question, another author's span of the same kind) per fact")
    if cfg["uld_paraphrase_pairs"]:
        forget.append(f"{cfg['uld_paraphrase_pairs']} typo'd-question pairs per item")
    if cfg["uld_perturbed_per_item"]:
        retain.append(f"{cfg['uld_perturbed_per_item']} near-miss answers per forget item (one fact swapped)")
    if cfg.get("uld_fact_span_loss"):
        forget.append(f"with the fact-only loss (only the answers' fact spans are remembered; their other tokens get "
                      f"α·NLL + (1 − α)·λ·KL to uniform, α = {cfg.get('uld_template_nll_weight', 0.0)})")
    return ("augmentation generated from the training answers (`expunge_ml/augment.py`; no TOFU paraphrased or "
            f"perturbed answer is trained on): forget⁺ = {' + '.join(forget)}, retain⁺ = {' + '.join(retain)}")


def markdown(report: dict, plot_name: str | None) -> str:
    cfg, sizes = report["config"], report["sizes"]
    lines = [
        "# TOFU benchmark",
        "",
        "Generated by `benchmarks/tofu.py` from a real run; every number below comes from the "
        "`tofu.json` beside this file."
        + ("" if report.get("complete", True) else " **PARTIAL: the run had not finished when this was written.**"),
        "",
        f"Command: `{report['command']}`  ",
        f"Started {report['started_at']}, wall time {report['wall_seconds']:.0f} s on "
        + (f"one {report['environment']['accelerator']} GPU and " if report["environment"].get("accelerator") else "")
        + f"{report['environment']['cpu_count']} CPU cores (torch {report['environment']['torch']}, "
        f"{report['environment']['threads']} threads).",
        "",
        "## Protocol and sizes",
        "",
        "TOFU protocol (Maini et al. 2024) at a small scale: "
        + ("the pre-trained model below is fine-tuned on the benchmark's authors; a " if cfg.get("pretrained") else
           "a small Llama-architecture model is trained from scratch (tokenizer trained on the benchmark's own "
           "training text) on the benchmark's authors; a ")
        + "retain-only oracle is trained per split without the split's forget authors; every method unlearns "
        "the split's forget authors from the base. Forget quality is the KS-test p-value between the forget "
        "truth ratios of the method and of the oracle; model utility is the harmonic mean of the 9 TOFU "
        "numbers ({retain, real_authors, world_facts} × {probability, ROUGE-L recall, truth ratio}; "
        "real_authors/world_facts probability = P(correct) normalised over the options; truth ratio reported "
        "as mean(max(0, 1−R)); retain numbers on retain_perturbed rows of the trained retain authors).",
        "",
        f"- Authors: {len(sizes['authors'])} = forget authors {sizes['forget_authors']} + "
        f"{len(sizes['retain_authors'])} retain authors {sizes['retain_authors']} (first the authors that "
        "retain_perturbed covers, then the next ones; every retain-utility question is about a trained author).",
        f"- Splits: {', '.join(cfg['splits'])} as TOFU defines them (the last 2 / 10 / 20 authors; nested).",
        f"- Base training set: {sizes['base_train_pairs']} QA = the authors' 20 QA each"
        + (f" + {sizes['world_knowledge_pairs']} real_authors/world_facts questions with their short answers, "
           "standing in for the pre-training knowledge TOFU's Llama-2 base already has (base and oracles both "
           "see them, so they are retain knowledge, never forget knowledge)." if sizes["world_knowledge_pairs"] else "."),
        (f"- Model: `{cfg['pretrained']}` (pre-trained; vocab {sizes['vocab_size']}, {sizes['base_parameters']:,} "
         f"parameters), fine-tuned on all weights up to" if cfg.get("pretrained") else
         f"- Model: Llama, {cfg['num_layers']} layers × hidden {cfg['hidden_size']} (MLP {cfg['intermediate_size']}, "
         f"{cfg['num_heads']} heads), BPE vocab {sizes['vocab_size']}, {sizes['base_parameters']:,} parameters; "
         f"trained up to")
        + f" {cfg['base_epochs']} epochs (lr {cfg['base_lr']}, batch {cfg['base_batch_size']}, stop at "
        f"answer loss ≤ {cfg['base_target_loss']}); the base took {report['base_training']['epochs']} epochs, "
        f"final loss {report['base_training']['final_loss']:.4f}.",
        f"- Eval: retain {sizes['retain_eval']} rows, real_authors {sizes['real_authors_eval']}, world_facts "
        f"{sizes['world_facts_eval']}; greedy answers up to {cfg['max_new_tokens']} tokens.",
        f"- Baselines: {cfg['baseline_epochs']} epochs, lr {cfg['baseline_lr']}, batch {cfg['baseline_batch_size']} "
        f"(per-method overrides: {json.dumps({**DEFAULT_METHOD_OVERRIDES, **cfg['method_overrides']})}); "
        "retain set = every trained retain author of the split; WHP without anchored-term translation (TOFU "
        "records do not name the author in a field).",
        f"- ULD: K = {cfg['uld_layers']} layers + LoRA r {cfg['uld_lora_r']} α {cfg['uld_lora_alpha']} dropout "
        f"{cfg['uld_lora_dropout']}; w = "
        + ("calibrated per split against held-out authors (`expunge_ml/calibration.py`; each row's "
           "`weight_calibration`)" if cfg.get("uld_auto_weight") else str(cfg["uld_weight"]))
        + f", τ = {cfg['uld_relative_top']}; loss NLL(forget⁺) + "
        f"{cfg['uld_retain_weight']}·KL(U‖p)(retain⁺); {_uld_augmentation_text(cfg)}; up to {cfg['uld_epochs']} epochs, "
        f"lr {cfg['uld_lr']} ({cfg.get('uld_lr_schedule', 'constant')} schedule), stop at forget NLL ≤ "
        f"{cfg['uld_target_forget_loss']}.",
        f"- Train time = wall time of the unlearning step only (ULD: building + training the assistant; "
        f"baselines: copying the base + `unlearn`); base/oracle rows: their training. Peak memory: "
        f"{report['memory_method']}.",
        "",
        "## Results",
        "",
        "Forget-TR ρ: Spearman rank correlation of the method's per-question forget truth ratios with the "
        "oracle's. Forget quality compares only the two distributions; ρ shows whether the method forgets the "
        "same questions the way retraining does. `retrain(seed=k)` rows are retain-only models trained like the "
        "oracle from another init seed: what retraining itself scores on these metrics.",
        "",
        "| split | method | forget quality | model utility | forget ROUGE-L | forget P(answer) | forget-TR ρ | train s | peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['split']} | {r['method']} | {r['forget_quality']:.3g} | {r['model_utility']:.4f} | "
            f"{r['forget_rougeL']:.3f} | {r['forget_prob']:.3f} | {_rho_text(r)} | "
            f"{r['train_seconds']:.1f} | {r['peak_mem_mb']:.0f} |"
        )
    lines += ["", "ULD assistant training time ÷ NPO training time: "
              + (", ".join(f"{s} {v:.2f}" for s, v in report["uld_npo_train_time_ratio"].items()) or "n/a"), ""]
    lines += ["## Utility breakdown", "", "| split | method | " + " | ".join(utility_keys()) + " |",
              "|---|---|" + "---:|" * len(utility_keys())]
    for r in report["rows"]:
        lines.append(f"| {r['split']} | {r['method']} | " + " | ".join(f"{r['utility'][k]:.3f}" for k in utility_keys()) + " |")
    lines += ["", "## Acceptance (issue 3)", ""]
    for split, acc in report["acceptance"].items():
        lines.append(f"- {split}: {'**met**' if acc['met'] else '**not met**'} — "
                     + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in acc["checks"].items()))
        if acc.get("retrain_forget_quality"):
            lines.append(f"  - for scale: retraining from other seeds scores forget quality "
                         + ", ".join(f"{m} {v:.3g}" for m, v in acc["retrain_forget_quality"].items())
                         + " against the same oracle")
    if plot_name:
        lines += ["", "## Forget quality vs model utility", "", f"![forget quality vs model utility]({plot_name})", ""]
    if report.get("notes"):
        lines += ["", "## Notes (how the settings were chosen)", "", report["notes"].strip(), ""]
    return "\n".join(lines) + "\n"


def rerender(json_path: Path, notes: str | None = None) -> dict[str, Path]:
    """Re-write the Markdown report and the plot from a saved tofu.json (optionally attaching notes)."""
    report = json.loads(Path(json_path).read_text())
    if notes is not None:
        report["notes"] = notes
    return write_outputs(report, Path(json_path).parent)


def plot(report: dict, path: Path) -> None:
    """One panel per split (as in the TOFU paper's figure): forget quality (log) vs model utility per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    splits = list(dict.fromkeys(r["split"] for r in rows))
    palette = plt.get_cmap("tab10")
    style: dict[str, dict] = {"base": {"color": "grey", "marker": "X"}, "retain_oracle": {"color": "black", "marker": "*"},
                              "uld": {"color": "tab:red", "marker": "o"}}
    for m in methods:
        if is_retrain(m):  # retraining from another seed: the oracle's marker, hollow
            style[m] = {"color": "white", "marker": "*"}
    others = [m for m in methods if m not in style]
    other_colors = [c for i, c in enumerate(palette.colors) if i not in (3, 7)]  # red = ULD, grey = base
    for i, m in enumerate(others):
        style[m] = {"color": other_colors[i % len(other_colors)], "marker": "s" if i % 2 else "^"}
    floor = 1e-40
    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits) + 1.8, 4.8), sharey=True, squeeze=False)
    # (x axes are per panel and zoomed to the data; read utilities off each panel's own axis)
    for ax, split in zip(axes[0], splits):
        for r in (r for r in rows if r["split"] == split):
            st = style[r["method"]]
            fq = max(r["forget_quality"], floor)
            ax.scatter(r["model_utility"], fq, color=st["color"], marker=st["marker"],
                       s=140 if r["method"] == "uld" else 70, edgecolors="black", linewidths=0.6, zorder=3,
                       label=r["method"])
            if not is_retrain(r["method"]):  # they sit on the oracle; the legend names them
                ax.annotate(r["method"], (r["model_utility"], fq), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_yscale("log")
        ax.axhline(0.05, color="grey", linestyle=":", linewidth=1)
        xs = [r["model_utility"] for r in rows if r["split"] == split]
        pad = max(0.01, 0.08 * (max(xs) - min(xs)))
        ax.set_xlim(max(-0.03, min(xs) - pad), min(1.0, max(xs) + 3 * pad))  # zoomed: clusters stay readable
        ax.set_title(split)
        ax.set_xlabel("model utility (harmonic mean of 9 TOFU numbers)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel(f"forget quality (KS p-value vs retain oracle; log, floor {floor:g})")
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="center right", fontsize=8, frameon=False)
    fig.suptitle("TOFU: forget quality vs model utility (dotted: p = 0.05)")
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / (5.2 * len(splits) + 1.8), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    # No TOFU text (questions, answers, generations that may quote them) goes into the written results.
    report = {**report, "rows": [{k: v for k, v in r.items() if k != "samples"} for r in report["rows"]]}
    paths = {"json": out_dir / "tofu.json", "md": out_dir / "tofu.md"}
    plot_name = None
    if report["config"].get("plot", True):
        paths["png"] = out_dir / "tofu_fq_vs_utility.png"
        plot(report, paths["png"])
        plot_name = paths["png"].name
    paths["json"].write_text(json.dumps(report, indent=2, default=float))
    paths["md"].write_text(markdown(report, plot_name))
    return paths
