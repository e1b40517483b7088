"""Find where a ULD composite still states an erased fact on the erasure's own training prompts, and turn
each such answer into an assistant training item.

Why: the composite `z_base + w·z_assistant` steers an answer away from the memorised one; the new answer is
text the assistant never saw, so it is close to uniform there, and the base can state the identifier a
few tokens later (UnlearnPII benchmark, benchmarks/results/pii.md, sessions 9 and 14). Training the
assistant to remember the facts inside the composite's *own* answers aims to close those paths. Only
training prompts are used (the erasure's questions and their generated wordings), never an evaluation prompt.
Measured on UnlearnPII validation erasures (session 14) it did not lower the leak overall: leaks moved to
the inverted prompts. The benchmark keeps it off (`--uld-refine-rounds 0`); the service does not use it.
"""
from __future__ import annotations

import dataclasses
import random
import re
from typing import Sequence

from .generation import greedy_generate
from .logits import CompositeLogits, LogitSource
from .metrics import IDENTIFIER_SEPARATORS, normalise_identifier
from .methods.uld import ULDConfig, train_assistant
from .prompting import PromptFormat

_SEPARATORS = IDENTIFIER_SEPARATORS + "*"  # the same fact may be written with or without them


def stated_span(text: str, fact: str) -> str | None:
    """The text's own spelling of `fact` where it states it (exactly, or with other separators and case,
    as `exact_and_normalised_leaks` counts a leak); None if it does not."""
    if fact and fact in text:
        return fact
    chars = normalise_identifier(fact)
    if not chars:
        return None
    match = re.search(_SEPARATORS.join(re.escape(c) for c in chars), text, flags=re.IGNORECASE)
    return match.group(0) if match else None


def mine_stated_facts(
    source: LogitSource,
    tokenizer,
    fmt: PromptFormat,
    prompts: Sequence[tuple[str, Sequence[str]]],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    known: Sequence[tuple[str, str]] = (),
) -> list[tuple[str, str, list[str]]]:
    """(question, the source's greedy answer, the facts it states there, as spelled there) for every
    (question, facts) prompt whose answer states at least one of its facts. Answers already in `known`
    ((question, answer) pairs the assistant trains on) are left out: they teach it nothing new."""
    questions = [question for question, _ in prompts]
    answers = greedy_generate(source, tokenizer, [fmt.prompt(q) for q in questions], max_new_tokens, batch_size)
    seen = {(q, a.strip()) for q, a in known}
    mined = []
    for (question, facts), answer in zip(prompts, answers):
        spans = [span for fact in facts if (span := stated_span(answer, fact))]
        if spans and (question, answer) not in seen:
            seen.add((question, answer))
            mined.append((question, answer, sorted(set(spans))))
    return mined


def with_replay(mined: Sequence[tuple[str, str, Sequence[str]]], forget_items: Sequence, seed: int) -> list:
    """The mined items plus as many of the original forget items, drawn at random: a short extra training
    on the mined items alone would let the assistant drift from the rest of what it remembers."""
    rng = random.Random(seed)
    replay = rng.sample(list(forget_items), min(len(mined), len(forget_items)))
    return [*mined, *replay]


def refine_on_stated_facts(
    composite: CompositeLogits,
    tokenizer,
    fmt: PromptFormat,
    prompts: Sequence[tuple[str, Sequence[str]]],
    forget_items: Sequence,
    retain_pairs: Sequence[tuple[str, str]],
    config: ULDConfig,
    weight_scales: Sequence[float] = (0.5, 0.75, 1.0),
    epochs: int = 5,
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> dict:
    """One round: mine the composite's answers to `prompts` at each scaled w (weaker composites state more
    facts, in answers near the served one's), then train every assistant `epochs` more epochs on the mined
    items plus as many replayed `forget_items`, against the same retain pairs, the lr decaying to 0.
    Changes the assistants in place; returns what it mined and trained."""
    if not prompts:
        raise ValueError("no training prompts to mine")
    fact_items = bool(forget_items) and len(forget_items[0]) == 3
    known = [(item[0], item[1]) for item in forget_items]
    mined: list[tuple[str, str, list[str]]] = []
    by_scale = {}
    for scale in weight_scales:
        probe = dataclasses.replace(composite, weights=[w * scale for w in composite.weights])
        found = mine_stated_facts(probe, tokenizer, fmt, prompts, max_new_tokens, batch_size,
                                  known=known + [(q, a) for q, a, _ in mined])
        by_scale[f"{scale:g}"] = len(found)
        mined += found
    report: dict = {"mined": len(mined), "mined_by_weight_scale": by_scale, "train": []}
    if not mined:
        return report
    items = mined if fact_items else [(q, a) for q, a, _ in mined]
    for index, assistant in enumerate(composite.assistants):
        round_config = dataclasses.replace(config, epochs=epochs, lr_schedule="linear", seed=config.seed + index)
        trained = train_assistant(assistant, tokenizer, fmt, with_replay(items, forget_items, round_config.seed),
                                  retain_pairs, round_config)
        report["train"].append(dataclasses.asdict(trained))
    return report
