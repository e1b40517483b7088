"""`expunge benchmark tofu`: the TOFU protocol (Maini et al. 2024) for ULD and the baselines.

Protocol (scaled down to what a CPU can do, shape kept):
1. a base model is trained on the benchmark's authors (the forget authors of the largest requested split
   + some retain authors), plus — standing in for the pre-training a real LLM has — the real_authors /
   world_facts questions with their short answers (TOFU's base already knows those);
2. per split, a retain-only oracle is trained the same way without the split's forget authors;
3. per split and method, the base is unlearned (baselines: the model is fine-tuned; ULD: assistants are
   trained by the pipeline's recipe and the served model is the logit difference), timed, and its peak
   memory measured;
4. every model (base, oracle, unlearned) is evaluated: forget truth ratios → forget quality (KS p-value
   against the oracle's), forget ROUGE-L, and the 9 TOFU utility numbers → model utility.

Trained bases and oracles are cached by a hash of everything that determines them (`benchmarks.model_cache`).
Modules: `options` (settings), `plan` (which records play which part), `evaluation` (TOFU's numbers),
`runner` (the run), `report` (JSON, Markdown, plot).
"""
from __future__ import annotations

from ..model_cache import _IDENTITIES, pretrained_identity
from .evaluation import acceptance, evaluate_source, rank_correlation
from .options import (ALL_METHODS, DEFAULT_CACHE_DIR, DEFAULT_DATA_DIR, DEFAULT_OUT_DIR, REPO_ROOT, TOFU_ULD,
                      TofuBenchOptions)
from .plan import make_plan, uld_pairs
from .report import print_table, rerender, write_outputs
from .runner import run_tofu_benchmark

__all__ = [
    "ALL_METHODS", "DEFAULT_CACHE_DIR", "DEFAULT_DATA_DIR", "DEFAULT_OUT_DIR", "REPO_ROOT", "TOFU_ULD",
    "TofuBenchOptions", "_IDENTITIES", "acceptance", "evaluate_source", "make_plan", "pretrained_identity",
    "print_table", "rank_correlation", "rerender", "run_tofu_benchmark", "uld_pairs", "write_outputs",
]
