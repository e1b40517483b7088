"""The benchmark's settings: `PIIBenchOptions`, its presets and the smoke configuration."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from expunge_ml.methods.uld import ULDConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "datasets" / "unlearn_pii"
DEFAULT_CACHE_DIR = REPO_ROOT / ".expunge" / "benchmarks" / "pii_cache"
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"
# Where `expunge benchmark export-smollm2` writes SmolLM2-135M-Instruct (relative to the working directory).
SMOLLM2_DIR = ".expunge/models/smollm2"
KINDS = ("direct", "paraphrased", "inverted")
# The quantized copies each served model's erased probes are asked again on (`quant_attacks`).
QUANT_ATTACKS = ("int8", "int4", "nf4")
QUANT_GROUP_SIZE = 64  # the pipeline evidence's round-to-nearest group size (`EvidenceOptions.quant_group_size`)
N_PARAPHRASES = 5
SPLIT_FILES = {"forget1": "forget1.json", "forget5": "forget5.json", "forget10": "forget10.json"}
REQUIRED_FILES = ("forget10.json", "forget10_names.json", "test_retain_pii_sample.json")

# Goals from the issue: erased people's PII leak rate ≤ 1 %, retained recall ≥ 95 % of the base's.
GOAL_MAX_ERASED_LEAK = 0.01
GOAL_MIN_RETAINED_RATIO = 0.95

# The ULD settings of the reported run, chosen on validation erasures (benchmarks/results/pii.md). Epochs
# come per split from `PIIBenchOptions.uld_epochs`.
DEFAULT_ULD = ULDConfig(
    n_layers=2, lora_r=16, lora_alpha=32, lora_dropout=0.05, weight=-1.8, relative_top=0.0, retain_weight=10.0,
    lr=3e-3, batch_size=8, target_forget_loss=0.05, fact_span_loss=True, template_nll_weight=0.7,
    question_paraphrases=3, assistants=4, identifier_pairs=True, bare_identifiers=True, subject_pairs=True,
    masked_answer_pairs=True, augment_paraphrased=True, augment_perturbed=False, augmentation="corpus", seed=0,
)


@dataclass(frozen=True)
class PIIBenchOptions:
    # Which entry of PRESETS these options started from (recorded, so a report names how to rerun it).
    preset: str = "scratch"
    data_dir: Path = DEFAULT_DATA_DIR
    splits: tuple[str, ...] = ("forget1", "forget5")
    methods: tuple[str, ...] = ("uld", "ga", "npo")
    # People trained into the base: the first n_people of forget10_names (split people always added).
    # 20: all forget10 people, so the 10 outside forget5 serve as retained people and validation erasures;
    # 0: only the splits' people. The retain sample is always trained.
    n_people: int = 20
    retain_sample_rows: int | None = None  # rows of test_retain_pii_sample.json (None: all 25)
    # Base training data per QA row: direct + this many paraphrased pairs (+ the inverted pair).
    base_paraphrases: int = N_PARAPHRASES
    base_inverted: bool = True
    # A local HF causal-LM directory to fine-tune as the base instead of training a small Llama from scratch
    # (its own tokenizer; the shape fields below then do not apply). A pre-trained model carries facts across
    # wordings, so with `base_paraphrases=0` the paraphrased probes measure what a real LLM leaks.
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
    # ULD: the pipeline's `ULDConfig`, trained on `expunge_ml.uld_data.training_pairs`.
    uld: ULDConfig = DEFAULT_ULD
    # ULD epochs per split (forget5 has 5× the pairs per epoch): "split=n,..." or one number for all;
    # "" trains every split `uld.epochs`.
    uld_epochs: str | int = "forget1=60,forget5=15,forget10=8"
    # Candidate w for the row "uld calibrated", chosen per erasure by the relative rule
    # (`expunge_ml.weight_selection.choose_weight_relative`) on the erasure's own training questions and
    # their LM wordings, never an evaluation prompt: from `uld.weight`, each stronger candidate in turn while
    # the retained ratio there stays >= uld_calibrate_min_retained × `uld.weight`'s own. () for no such row.
    uld_calibrate_weights: tuple[float, ...] = (-1.8, -2.0, -2.2, -2.4, -2.6, -2.8, -3.0)
    uld_calibrate_min_retained: float = 0.97
    paraphraser: str = ""  # writes `uld.question_paraphrases` wordings: a local causal LM directory ("": SMOLLM2_DIR)
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
    seed: int = 0  # the base's init and data order, and the GA/NPO runs (the assistants seed from `uld.seed`)
    # 1 thread: on a shared 2-core machine more threads run slower per step under contention.
    threads: int | None = 1
    device: str = "auto"  # where models train and run: auto (a CUDA GPU if torch sees one) | cpu | cuda[:N]
    # Validation erasure, for choosing settings without the reported splits' people; replaces the reported
    # splits in the run, on the same base. "retain_sample": erase the first N retain-sample people (split
    # "validation"). "forget10": erase trained forget10 people who are in no reported split, N at a time, as
    # two disjoint erasures where they fit ("validation1", "validation2"). Retained = every trained person
    # outside the reported splits and the erasure.
    validation_people: int = 0
    validation_source: str = "retain_sample"
    # A validation erasure's assistant also stays uniform on the reported splits' people (they join its
    # retain set, never its measurement), so the erasure has the reported splits' shape.
    validation_retain_reported: bool = False
    # Ask quantized copies of each served model (base, each method, the calibrated ULD) the erased probes
    # again, as the pipeline's evidence does: unlearning that only moved weights a little can come back
    # after 4-bit quantization. Reported beside the rows (`quantized`), not in the goals.
    quant_attacks: tuple[str, ...] = QUANT_ATTACKS
    cache_dir: Path = DEFAULT_CACHE_DIR
    out_dir: Path | None = DEFAULT_OUT_DIR  # None: write nothing

    def __post_init__(self) -> None:
        if self.uld_epochs not in ("", None) and self.uld.epochs != DEFAULT_ULD.epochs:
            raise ValueError(f"uld.epochs {self.uld.epochs} would be overridden by uld_epochs {self.uld_epochs!r}: "
                             "set uld_epochs to \"\" to train every split uld.epochs")

    def uld_for_split(self, split: str) -> ULDConfig:
        """The ULD config an erasure of `split` trains with: `uld` with that split's epochs."""
        if self.uld_epochs in ("", None):
            return self.uld
        return replace(self.uld, epochs=per_split(self.uld_epochs, split))

    @property
    def writes_question_wordings(self) -> bool:
        """Whether a run asks the paraphraser for wordings: only ULD trains on them."""
        return bool(self.uld.question_paraphrases) and "uld" in self.methods

    def base_key(self, data_digest: str, people: Sequence[str], device_type: str = "cpu") -> str:
        """Hash of everything that determines the base model (not the unlearning settings)."""
        fields = {k: v for k, v in asdict(self).items() if k in BASE_FIELDS}
        fields["data"] = data_digest
        fields["people"] = list(people)
        # The thread count and the device change the float summation order, hence the trained weights: a
        # base built another way is another base. Keyed only where they differ from 1 thread on the CPU.
        if self.threads != 1:
            fields["threads"] = self.threads
        if device_type != "cpu":
            fields["device"] = device_type
        if self.pretrained:  # pinned by its weights, so a cache entry never outlives the model it was tuned from
            from ..tofu import pretrained_identity

            fields["pretrained"] = pretrained_identity(self.pretrained)
        blob = json.dumps(fields, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


BASE_FIELDS = {
    "retain_sample_rows", "base_paraphrases", "base_inverted", "vocab_size",
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "base_epochs", "base_lr", "base_batch_size", "base_target_loss", "seed",
}


def is_validation(split: str) -> bool:
    """Whether a split is a validation erasure (`validation1`, …), made for choosing settings."""
    return split.startswith("validation")


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


# Named starting points for `--preset`, in the shape of a `--config` file; a config file and the flags
# override them. Each is the configuration of a committed report.
PRESETS: dict[str, dict[str, Any]] = {
    # A small Llama trained from scratch on every wording (benchmarks/results/pii.json).
    "scratch": {},
    # SmolLM2-135M-Instruct fine-tuned on one wording per fact (direct + inverted pairs)
    # (benchmarks/results/pii_smollm2/). ULD epochs give every split about 690 assistant steps.
    "smollm2": {
        "out_dir": DEFAULT_OUT_DIR / "pii_smollm2", "pretrained": SMOLLM2_DIR,
        "base_paraphrases": 0, "base_lr": 2e-4, "base_batch_size": 8, "base_epochs": 8, "base_target_loss": 0.05,
        "uld": {"n_layers": 8, "lr": 3e-3, "weight": -1.0, "assistants": 1, "retain_weight": 20.0,
                "question_paraphrases": 0, "bare_identifiers": False},
        "uld_epochs": "forget1=30,forget5=6,forget10=3", "uld_calibrate_weights": (), "threads": 2,
        # GA/NPO unlearn at the base's fine-tuning lr, as TOFU does.
        "baseline_lr": 2e-4,
    },
}


def preset_options(name: str) -> PIIBenchOptions:
    from ..run_config import merge

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return merge(PIIBenchOptions(preset=name), PRESETS[name], f"preset {name}")


# The test suite's smoke configuration: 2 people to erase, a few retained rows, a tiny model, one assistant,
# no LM wordings (they need the SmolLM2 export) and no calibration row.
SMOKE_SETTINGS: dict[str, Any] = {
    "splits": ("forget1",), "methods": ("uld",),
    "n_people": 0, "retain_sample_rows": 4,  # only the two forget1 people and four retain-sample rows
    "base_paraphrases": 1, "vocab_size": 600, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 160, "base_epochs": 25, "base_lr": 5e-3,
    "base_target_loss": 0.05,
    "uld": {"n_layers": 1, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lr": 1e-2, "assistants": 1,
            "question_paraphrases": 0},
    "uld_epochs": 10, "uld_calibrate_weights": (), "max_new_tokens": 32,
}


def smoke_options() -> PIIBenchOptions:
    from ..run_config import merge

    return merge(PIIBenchOptions(), SMOKE_SETTINGS, "smoke settings")
