"""ULD — Unlearning from Logit Difference (Ji et al., 2024).

Instead of damaging the served model, train a small *assistant* to remember exactly what must be
forgotten (NLL on the forget set) and to know nothing about what must be kept (KL to uniform on the
retain set). Serving `z_base + w·z_assistant` with w < 0 then subtracts the forgotten knowledge while
leaving retain logits untouched (a uniform assistant only shifts all logits by a constant).

The assistant is the base's first K decoder layers + embeddings + final norm + LM head, with LoRA on
every linear layer but the LM head. Only the LoRA adapter is stored: the frozen part is rebuilt from
the base, which is pinned by weight hash.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from ..augment import (bare_identifier_pairs, donor_pool, generated_fact_pairs, generated_forget_pairs,
                       generated_near_misses, identifier_items, with_fact_labels)
from ..devices import model_device, to_device
from ..logits import check_subtractions
from ..prompting import PromptFormat, collate_qa, collate_qa_facts
from ..quantization import quiet_bitsandbytes_import
from .losses import answer_kl_to_uniform, answer_nll, fact_nll_and_template_kl

ASSISTANT_CONFIG_FILE = "uld_assistant.json"


@dataclass(frozen=True)
class ULDConfig:
    n_layers: int = 2  # K: decoder layers kept from the base
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    retain_weight: float = 5.0  # λ in NLL(forget) + λ·KL(U ‖ p)(retain)
    weight: float = -0.8  # w in z_base + w·z_assistant
    relative_top: float = 0.0  # τ; 0 disables the relative-top filter
    # How the served composite subtracts this assistant (`expunge_ml.logits.SUBTRACTIONS`): "linear" is
    # w·z_assistant; "one_sided" only pushes down tokens the assistant finds more likely than uniform, so the
    # tokens it rejects are not raised (see `combine_logits`; on the demo it forgot less and did not cure the
    # word salad, so profiles keep "linear"). Serving only: training is the same.
    subtraction: str = "linear"
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 8
    target_forget_loss: float = 0.05  # stop once the assistant remembers the forget set this well
    # ... and is this close to uniform on the retain set (mean KL(U ‖ p), nats). Why: an assistant as deep
    # as the base starts as the base, whose forget loss can already be under the target; stopping there
    # serves base + w·base, which wipes out everything (seen: retain ROUGE-L 0.997 → 0.065). Stops measured
    # on the UnlearnPII benchmark came at 0.2–0.36, the demo's assistants end near 0.05, and a memorising
    # base sits several nats from uniform.
    stop_max_retain_kl: float = 1.0
    augment_paraphrased: bool = True  # forget⁺ also holds other wordings of the forget QA
    augment_perturbed: bool = True  # retain⁺ also holds near-miss (wrong) answers to forget questions
    # Where those come from. "corpus": the records' paraphrased_answer / perturbed_answers columns.
    # "generated" (expunge_ml/augment.py): built from the training answers alone — near-miss answers with
    # one fact swapped for a retain record's, (question, fact) pairs, optional typo'd questions — so
    # the evidence's truth ratios (computed on the corpus's paraphrased / perturbed answers) are not
    # measured on text the assistant was trained on.
    augmentation: str = "corpus"
    near_misses_per_item: int = 2  # generated: wrong answers per forget item in retain⁺
    question_variants: int = 0  # generated: extra (typo'd question, answer) pairs per forget item
    fact_pairs: bool = True  # generated: (question, fact span) in forget⁺, (question, other span) in retain⁺
    seed: int = 0
    # "linear": decay the lr to 0 over the planned steps (a large constant lr makes the forget NLL oscillate
    # when the retain weight is high); "constant" keeps it fixed.
    lr_schedule: str = "constant"
    # With (question, answer, facts) forget items: the answer's non-fact (template) tokens get
    # α·NLL + (1 − α)·λ·KL(U ‖ p). α 0 keeps the template uniform (only the facts are remembered); α 1
    # remembers it like the facts. In between trades the erased facts' context against the retained
    # people's shared template.
    template_nll_weight: float = 0.0
    # Remember only the facts inside forget⁺ answers — the subject's names, aliases and identifiers
    # (`training_pairs(fact_terms=…)`), the forget records' `pii`, and every fact span of the answer
    # (`augment.fact_spans`: names, places, titles, numbers: an erasure covers all of the person's data,
    # not only identifiers) — with the rest of each answer weighted by template_nll_weight as above. Why:
    # retained people's answers share the forget answers' wording, and an assistant that remembers the
    # wording too takes it from them as well (UnlearnPII benchmark: retained PII 81 % → 96 % of the base
    # on a forget5-sized validation erasure).
    fact_span_loss: bool = False
    # N other wordings of every forget and retain question, written by a local instruction LM (the
    # deployment's `unlearning.paraphraser`; `expunge_ml/paraphrase.py`), each with the record's answer:
    # remembered for the forget records, uniform for the retain records. Why: the assistant recalls a fact
    # only after wordings it was trained on, so the composite leaks where the base answers another one
    # (UnlearnPII benchmark, benchmarks/results/pii.md, sessions 9 and 13). 0 turns it off.
    question_paraphrases: int = 0
    # N assistants that differ only in their seed (LoRA init, data order), each served at w / N: the composite
    # subtracts their mean. Why: where one assistant happens to be flat after an unseen wording, another often
    # is not (UnlearnPII benchmark, benchmarks/results/pii.md, sessions 12 and 14: 2 leaked less than 1, and 3
    # less than 2, on three bases' validation erasures). Costs N trainings.
    assistants: int = 1
    # (a forget record's identifiers → its subject) pairs to remember, and the same for the retain records to
    # stay uniform on (`augment.identifier_items`). Why: asked "whose date of birth is …?", the demo's base
    # names the person although it never trained on that direction, and an assistant trained on the QA alone
    # leaves that answer as it is (benchmarks/results/demo_subjects.md, session 24). The UnlearnPII benchmark
    # trains the same pairs (its `--uld-identifier-pairs`).
    identifier_pairs: bool = False
    # Each identifier of the forget records (`record.pii`) alone after an empty question, to remember, and each
    # of the retain records', to stay uniform on (`augment.bare_identifier_pairs`). Why: where the composite
    # leaked an erased identifier it followed a question wording the assistant never saw, and the assistant
    # was flat on every token of it; one that knows the identifier's own tokens breaks it off mid-way
    # (UnlearnPII benchmark, benchmarks/results/pii.md, session 29: adopted there, 33 leaks against 61 on four
    # bases' validation erasures with retained PII kept). An identifier in both sets is pulled both ways.
    bare_identifiers: bool = False

    def __post_init__(self) -> None:
        check_subtractions([self.subtraction], 1)  # a typo in a profile fails here, not at serving time


# Seed distance between the members of an ensemble, so member i of one erasure never repeats another's seed.
ASSISTANT_SEED_STRIDE = 1000


def ensemble_weights(weight: float, n_assistants: int) -> list[float]:
    """w / N for each of N assistants: the composite subtracts their mean at the total weight w."""
    if n_assistants < 1:
        raise ValueError("at least one assistant is needed")
    return [weight / n_assistants] * n_assistants


def ensemble_members(config: ULDConfig) -> list[ULDConfig]:
    """One config per assistant of `config.assistants`; the first keeps the seed, so N = 1 is the plain run."""
    if config.assistants < 1:
        raise ValueError(f"ULD assistants must be >= 1, got {config.assistants}")
    return [replace(config, seed=config.seed + ASSISTANT_SEED_STRIDE * index) for index in range(config.assistants)]


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder blocks, found by length so it works across HF architectures."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def truncate_layers(base: torch.nn.Module, n_layers: int) -> torch.nn.Module:
    """A copy of `base` keeping its first `n_layers` decoder layers (embeddings, norm, head intact)."""
    total = base.config.num_hidden_layers
    if not 1 <= n_layers <= total:
        raise ValueError(f"assistant layers K={n_layers} must be in 1..{total}")
    small = copy.deepcopy(base)
    layers = _decoder_layers(small)
    del layers[n_layers:]
    small.config.num_hidden_layers = n_layers
    layer_types = getattr(small.config, "layer_types", None)
    if isinstance(layer_types, list):
        small.config.layer_types = layer_types[:n_layers]
    return small


def build_assistant(base: torch.nn.Module, config: ULDConfig):
    with quiet_bitsandbytes_import():
        from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    small = truncate_layers(base, config.n_layers)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear",  # peft's "all-linear" excludes the output head
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft calls a transformers API deprecated in favour of another name: library noise, not ours
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(small, lora)


@dataclass
class ULDTrainReport:
    epochs: int
    steps: int
    forget_nll: float
    retain_kl: float
    seconds: float


def train_assistant(
    assistant: torch.nn.Module,
    tokenizer,
    fmt: PromptFormat,
    forget_pairs: Sequence[tuple[str, str]] | Sequence[tuple[str, str, Sequence[str]]],
    retain_pairs: Sequence[tuple[str, str]],
    config: ULDConfig,
    progress: Callable[[int, float, float], None] | None = None,
) -> ULDTrainReport:
    """Balanced sampling: every step sees one forget batch (remember) and one retain batch (uniform).

    Forget items may be (question, answer, facts): then only the answer tokens of the facts (e.g. the
    identifiers and names an erasure request supplies) are remembered, and the rest of the answer is
    pushed to uniform with the retain weight. Subtracting an assistant that remembers an answer's
    template would also push the composite off the template that retained people's answers share."""
    if not forget_pairs:
        raise ValueError("the forget set is empty")
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    assistant.train()
    params = [p for p in assistant.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    forget_order, retain_order = list(range(len(forget_pairs))), list(range(len(retain_pairs)))
    steps_per_epoch = math.ceil(len(forget_pairs) / config.batch_size)
    if config.lr_schedule not in ("constant", "linear"):
        raise ValueError(f"lr_schedule must be 'constant' or 'linear', got {config.lr_schedule!r}")
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda s: 1.0) if config.lr_schedule == "constant" else (lambda s: max(0.0, 1.0 - s / total_steps)))
    start, step, epoch, nll_mean, kl_mean = time.perf_counter(), 0, 0, float("inf"), 0.0
    retain_cursor = 0
    device = model_device(assistant)
    fact_items = len(forget_pairs[0]) == 3
    if not 0.0 <= config.template_nll_weight <= 1.0:
        raise ValueError(f"template_nll_weight must be in [0, 1], got {config.template_nll_weight}")
    if any((len(item) == 3) != fact_items for item in forget_pairs):
        raise ValueError("forget items must be all (question, answer) or all (question, answer, facts)")
    for epoch in range(1, config.epochs + 1):
        rng.shuffle(forget_order)
        nlls, kls = [], []
        for i in range(steps_per_epoch):
            forget_idx = forget_order[i * config.batch_size : (i + 1) * config.batch_size]
            if fact_items:  # remember only the facts; the answer's template stays uniform like retain text
                forget_batch = collate_qa_facts(tokenizer, fmt, [forget_pairs[j] for j in forget_idx])
                nll, template_kl, template_nll = fact_nll_and_template_kl(assistant, to_device(forget_batch, device))
                alpha = config.template_nll_weight
                loss = nll + alpha * template_nll + (1.0 - alpha) * config.retain_weight * template_kl
            else:
                forget_batch = collate_qa(tokenizer, fmt, [forget_pairs[j] for j in forget_idx])
                loss = nll = answer_nll(assistant, to_device(forget_batch, device))
            if retain_pairs:
                if retain_cursor == 0:
                    rng.shuffle(retain_order)
                retain_idx = [
                    retain_order[(retain_cursor + k) % len(retain_order)]
                    for k in range(config.batch_size)
                ]
                retain_cursor = (retain_cursor + config.batch_size) % len(retain_order)
                retain_batch = collate_qa(tokenizer, fmt, [retain_pairs[j] for j in retain_idx])
                kl = answer_kl_to_uniform(assistant, to_device(retain_batch, device))
                loss = loss + config.retain_weight * kl
                kls.append(kl.detach())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            nlls.append(nll.detach())  # averaged once per epoch: no GPU sync per step
            step += 1
        nll_mean = float(torch.stack(nlls).mean())
        kl_mean = float(torch.stack(kls).mean()) if kls else 0.0
        if progress:
            progress(epoch, nll_mean, kl_mean)
        if nll_mean <= config.target_forget_loss and (not kls or kl_mean <= config.stop_max_retain_kl):
            break
    assistant.eval()
    return ULDTrainReport(epoch, step, nll_mean, kl_mean, time.perf_counter() - start)


def save_assistant(assistant, config: ULDConfig, out_dir: Path) -> Path:
    """Store only the LoRA adapter + the ULD config; the frozen layers come from the pinned base."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    assistant.save_pretrained(out_dir)
    (out_dir / ASSISTANT_CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2, sort_keys=True))
    return out_dir


def load_assistant(base: torch.nn.Module, adapter_dir: Path) -> tuple[torch.nn.Module, ULDConfig]:
    with quiet_bitsandbytes_import():
        from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    config = ULDConfig(**json.loads((adapter_dir / ASSISTANT_CONFIG_FILE).read_text()))
    small = truncate_layers(base, config.n_layers)
    with warnings.catch_warnings():  # the same transformers deprecation that peft triggers in build_assistant
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        assistant = PeftModel.from_pretrained(small, adapter_dir)
    assistant.to(model_device(base))  # the composite runs base and assistant in one pass on one device
    assistant.eval()
    return assistant, config


def reworded_pairs(question_answers: Iterable[tuple[str, str]],
                   question_wordings: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
    """(wording, answer) for every wording of each (question, answer)'s question in `question_wordings`."""
    return [(wording, answer) for question, answer in question_answers
            for wording in question_wordings.get(question, ())]


def training_pairs(
    forget_records, retain_records, config: ULDConfig, donor_records=None, fact_terms: Sequence[str] = (),
    question_wordings: Mapping[str, Sequence[str]] | None = None,
) -> tuple[list[tuple[str, str]] | list[tuple[str, str, list[str]]], list[tuple[str, str]]]:
    """forget⁺ = forget QA + other wordings of them (remember the fact, not one wording);
    retain⁺ = retain QA + near-miss answers to the forget questions (near-misses stay unknown, so
    subtracting the assistant does not push the composite towards or away from them).

    With `augmentation="generated"` the wrong facts are drawn from `donor_records` (default: the retain
    records), deterministically from `config.seed`.

    With `config.fact_span_loss` the forget items are (question, answer, facts): facts = `fact_terms` (the
    request's names and identifiers) + every forget record's `pii` + the answer's own fact spans; a
    generated (question, fact span) pair is all fact.

    `question_wordings` (a question → other wordings of it, see `config.question_paraphrases`) adds
    (wording, the record's answer) for every forget and retain record whose question has some."""
    forget, retain = _augmented_pairs(forget_records, retain_records, config, donor_records)
    if question_wordings:
        forget += reworded_pairs(((r.question, r.answer) for r in forget_records), question_wordings)
        retain += reworded_pairs(((r.question, r.answer) for r in retain_records), question_wordings)
    if config.bare_identifiers:  # before the fact labels: a bare identifier is all fact
        bare = bare_identifier_pairs(r.pii or () for r in forget_records)
        if not bare:  # an option that silently trains nothing would pass for one that did
            raise ValueError("bare_identifiers found no identifiers in the forget records: the corpus needs a `pii` "
                             "column (or turn the option off)")
        forget += bare
        retain += bare_identifier_pairs(r.pii or () for r in retain_records)
    named = identifier_items(forget_records) if config.identifier_pairs else []
    if config.identifier_pairs:
        retain += [(q, a) for q, a, _ in identifier_items(retain_records)]
    if not config.fact_span_loss:
        return forget + [(q, a) for q, a, _ in named], retain
    request_facts = ({t.strip() for t in fact_terms if t and t.strip()}
                     | {p for r in forget_records for p in r.pii if p.strip()})
    # a record's whole answer (or paraphrase) carries its fact spans; anything else is a bare fact pair
    full_answers = {r.answer for r in forget_records} | {r.paraphrased_answer for r in forget_records}
    items = [(q, a, sorted(request_facts | set(facts)) if a in full_answers else facts)
             for q, a, facts in with_fact_labels(forget, full_answers)]
    items += [(q, a, [subject]) for q, a, subject in named]  # the name is the fact; "These details …" is template
    if not any(facts for _, _, facts in items):
        raise ValueError("fact_span_loss found no facts to remember: give the request's names or identifiers, "
                         "or a `pii` column in the corpus")
    return items, retain


def _augmented_pairs(forget_records, retain_records, config: ULDConfig, donor_records):
    """(forget⁺, retain⁺) as (question, answer) pairs."""
    if config.augmentation not in ("corpus", "generated"):
        raise ValueError(f"augmentation must be 'corpus' or 'generated', got {config.augmentation!r}")
    forget = [r.pair for r in forget_records]
    retain = [r.pair for r in retain_records]
    if config.augmentation == "corpus":
        if config.augment_paraphrased:
            forget += [(r.question, r.paraphrased_answer) for r in forget_records if r.paraphrased_answer]
        if config.augment_perturbed:
            retain += [(r.question, wrong) for r in forget_records for wrong in r.perturbed_answers]
        return forget, retain
    rng = random.Random(config.seed)
    donors = donor_pool(r.answer for r in (retain_records if donor_records is None else donor_records))
    if config.augment_paraphrased and config.question_variants:
        forget += generated_forget_pairs(forget_records, config.question_variants, rng)
    if config.augment_perturbed:
        retain += generated_near_misses(forget_records, donors, config.near_misses_per_item, rng)
    if config.fact_pairs:
        facts, wrong_facts = generated_fact_pairs(forget_records, donors, rng)
        forget += facts
        retain += wrong_facts
    return forget, retain
