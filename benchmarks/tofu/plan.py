"""Which TOFU records play which part in a run, and each method's training data (pure: options + data)."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from expunge_ml.corpus import QARecord
from expunge_ml.tofu import FORGET_SPLITS, TofuData, forget_authors

from .options import DEFAULT_METHOD_OVERRIDES, TofuBenchOptions


@dataclass
class Plan:
    """The authors trained, forgotten and evaluated, and the base's training pairs."""

    authors: list[int]
    forget_authors: dict[str, list[int]]  # split -> authors
    retain_authors: list[int]
    base_pairs: list[tuple[str, str]]
    world_pairs: list[tuple[str, str]]
    real_eval: list[QARecord]
    world_eval: list[QARecord]
    retain_eval: list[QARecord]
    kept_ids: set[str] = field(default_factory=set)  # the author QA rows in use

    def records(self, data: TofuData, authors) -> list[QARecord]:
        return [r for r in data.author_records(authors) if r.record_id in self.kept_ids]


@dataclass
class SplitSpec:
    """One unlearning task of the run: whom to forget, whom its oracle is trained on, what the methods retain."""

    name: str
    forget_authors: list[int]
    oracle_authors: list[int]
    retain_authors: list[int]
    eval_plan: Plan


def _retain_authors(data: TofuData, opts: TofuBenchOptions, chosen_forget: list[int]) -> list[int]:
    covered = [a for a in data.retain_perturbed_authors() if a not in chosen_forget]
    retain_authors = sorted(covered[: opts.n_retain_authors])
    if len(retain_authors) < opts.n_retain_authors:  # more than retain_perturbed covers: take the next ones
        extra = [a for a in range(200) if a not in retain_authors and a not in forget_authors("forget10")]
        retain_authors = sorted(retain_authors + extra[: opts.n_retain_authors - len(retain_authors)])
    return retain_authors


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
    retain_authors = _retain_authors(data, opts, chosen_forget)
    authors = sorted(retain_authors + chosen_forget)
    keep = data.author_records(authors)
    if opts.qa_per_author is not None:  # only the first qa_per_author QA of each author
        keep = [r for r in keep if int(r.record_id.split("-")[1]) % 20 < opts.qa_per_author]
    kept_ids = {r.record_id for r in keep}
    real_eval = data.real_authors[: opts.real_max] if opts.real_max is not None else list(data.real_authors)
    world_eval = data.world_facts[: opts.world_max] if opts.world_max is not None else list(data.world_facts)
    world_pairs = [r.pair for r in real_eval + world_eval] if opts.world_knowledge else []
    base_pairs = [r.pair for r in keep] + world_pairs
    retain_eval = [r for r in data.retain_eval_records(retain_authors) if r.record_id in kept_ids]
    if opts.retain_eval_max is not None:
        retain_eval = retain_eval[: opts.retain_eval_max]
    return Plan(authors, per_split, retain_authors, base_pairs, world_pairs, real_eval, world_eval, retain_eval,
                kept_ids)


def split_specs(plan: Plan, opts: TofuBenchOptions) -> list[SplitSpec]:
    """The TOFU splits of the run, or the one development split of `opts.dev_authors`."""
    if not opts.dev_authors:
        specs = []
        for split in opts.splits:
            others = [a for a in plan.authors if a not in plan.forget_authors[split]]
            specs.append(SplitSpec(split, plan.forget_authors[split], others, others, plan))
        return specs
    dev = list(opts.dev_authors)
    if any(a not in plan.retain_authors for a in dev) or len(dev) >= len(plan.retain_authors):
        raise ValueError(f"dev authors {dev} must be a proper subset of the retain authors {plan.retain_authors}")
    eval_plan = dataclasses.replace(
        plan, retain_eval=[r for r in plan.retain_eval if int(r.subject.split("-")[1]) not in dev])
    # the methods' retain set leaves out the TOFU forget authors, so tuning never touches them
    return [SplitSpec("dev", dev, [a for a in plan.authors if a not in dev],
                      [a for a in plan.retain_authors if a not in dev], eval_plan)]


def uld_pairs(forget: Sequence[QARecord], retain: Sequence[QARecord], opts: TofuBenchOptions,
              rng: random.Random):
    """forget⁺ / retain⁺ by the pipeline's recipe, from the forget records and `retain_per_forget`·|forget|
    sampled retain rows; near-miss answers and wrong facts are drawn from all of the split's retain records."""
    from expunge_ml.uld_data import training_pairs

    n_retain = min(len(retain), int(round(opts.retain_per_forget * len(forget))))
    retain_rows = rng.sample(list(retain), n_retain)
    return training_pairs(forget, retain_rows, opts.uld, donor_records=retain)


def baseline_config(name: str, opts: TofuBenchOptions):
    from expunge_ml.methods.registry import make_config

    overrides: dict[str, Any] = {
        "epochs": opts.baseline_epochs, "lr": opts.baseline_lr, "batch_size": opts.baseline_batch_size,
        "max_length": opts.max_length, "seed": opts.seed,
    }
    overrides.update(DEFAULT_METHOD_OVERRIDES.get(name, {}))
    overrides.update(opts.method_overrides.get(name, {}))
    return make_config(name, overrides)
