"""The TOFU benchmark's settings: `expunge benchmark tofu --config run.yaml` names what differs from these."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expunge_ml.methods.uld import ULDConfig
from expunge_ml.tofu import FORGET_SPLITS

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "datasets" / "tofu"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "expunge-bench"
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"
ALL_METHODS = ("uld", "ga", "graddiff", "kl", "npo", "simnpo", "idkdpo", "rmu", "whp")

# The assistant's recipe on TOFU. Augmentation is generated from the training answers: TOFU's paraphrased and
# perturbed answers are the texts the truth ratio is computed on, so training on them would grade the
# assistant on its own training text.
TOFU_ULD = ULDConfig(
    n_layers=2, lora_r=16, lora_alpha=32, lora_dropout=0.05, weight=-0.8, relative_top=0.01, epochs=20, lr=1e-3,
    batch_size=8, retain_weight=5.0, target_forget_loss=0.05, augmentation="generated", augment_paraphrased=False,
    augment_perturbed=True, near_misses_per_item=2, fact_pairs=True,
)

# RMU's c = 6.5 was tuned for Zephyr-7B activations: make it relative to this model's hidden norms.
DEFAULT_METHOD_OVERRIDES: dict[str, dict[str, Any]] = {"rmu": {"steering_relative": True, "steering_coeff": 2.0}}


@dataclass(frozen=True)
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
    uld: ULDConfig = TOFU_ULD
    # The assistant's retain set: this many sampled retain rows per forget row (at most all of them).
    retain_per_forget: float = 1.0
    # Evaluation
    max_new_tokens: int = 56
    eval_batch_size: int = 32
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None: torch's default
    device: str = "auto"  # where models train and run: auto (a CUDA GPU if torch sees one) | cpu | cuda[:N]
    # Development split for choosing settings without looking at the TOFU forget splits: forget these
    # *retain* authors instead (a dev oracle is trained without them); replaces the TOFU splits in the run.
    dev_authors: tuple[int, ...] = ()
    # Retraining's own noise floor: retrain-only models with these other init seeds, rows
    # "retrain(seed=k)", scored against the seed-`seed` oracle like every method (cached like the oracle).
    retrain_seeds: tuple[int, ...] = (1, 2)
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
        self._validate_uld()
        if self.seed in self.retrain_seeds or len(set(self.retrain_seeds)) != len(self.retrain_seeds):
            raise ValueError(f"retrain_seeds {list(self.retrain_seeds)} must be distinct and differ from seed {self.seed}"
                             " (that seed is the oracle itself)")
        from expunge_ml.quantization import SUPPORTED_BITS

        if any(b not in SUPPORTED_BITS for b in self.quant_bits):
            raise ValueError(f"quant_bits {list(self.quant_bits)}: each must be one of {SUPPORTED_BITS}")
        if self.quant_group_size is not None and self.quant_group_size < 1:
            raise ValueError("quant_group_size must be a positive int or None (one scale per output row)")

    def _validate_uld(self) -> None:
        if self.uld.n_layers < 1 or (self.pretrained is None and self.uld.n_layers > self.num_layers):
            raise ValueError(f"uld.n_layers must be in 1..{self.num_layers}")  # a pretrained model's depth: checked at build
        if self.uld.augmentation != "generated":
            raise ValueError(f"uld.augmentation must be 'generated' on TOFU, got {self.uld.augmentation!r}: its "
                             "corpus paraphrases and perturbations are the texts the truth ratio is computed on")
        if self.uld.question_paraphrases:
            raise ValueError("uld.question_paraphrases needs a paraphraser LM, which the TOFU benchmark does not run")
