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

import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..devices import model_device, to_device
from ..prompting import PromptFormat, collate_qa, collate_qa_facts
from ..quantization import quiet_bitsandbytes_import
from .losses import answer_kl_to_uniform, answer_nll, fact_nll_and_template_kl

ASSISTANT_CONFIG_FILE = "uld_assistant.json"


@dataclass(frozen=True)
class ULDConfig:
    n_layers: int = 2  # K decoder layers kept from the base: a small assistant is cheap to train and serve
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    retain_weight: float = 5.0  # λ in NLL(forget) + λ·KL(U ‖ p)(retain): how hard retained text is kept uniform
    weight: float = -0.8  # w in z_base + w·z_assistant: negative subtracts what the assistant remembers
    relative_top: float = 0.0  # τ: keep only tokens the base finds plausible; 0 disables the filter
    epochs: int = 20
    # ... and at least this many steps: a person's forget set is a handful of batches, and 20 passes over it are
    # too few steps for a real LM's assistant to remember it (0: epochs alone decide).
    min_steps: int = 0
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "linear" decay to 0 over the planned steps: a steadier forget NLL at a high lr
    batch_size: int = 8
    target_forget_loss: float = 0.05  # stop once the assistant remembers the forget set this well ...
    # ... and is this close to uniform on the retain set (mean KL(U ‖ p), nats): a deep assistant starts as the
    # base, and serving base + w·base before it has flattened on retained text would wipe everything out.
    stop_max_retain_kl: float = 1.0
    augment_paraphrased: bool = True  # corpus: forget⁺ also holds the paraphrased answer (the fact, not one wording)
    augment_perturbed: bool = True  # retain⁺ also holds near-miss answers, so the assistant is sharp on the facts only
    # "corpus": paraphrased / perturbed answers from the corpus's columns; "generated" (`expunge_ml.augment`):
    # built from the training answers alone, so evaluation texts are never trained on.
    augmentation: str = "corpus"
    near_misses_per_item: int = 2  # generated: wrong answers per forget item in retain⁺
    fact_pairs: bool = True  # generated: (question, fact span) in forget⁺, (question, other span) in retain⁺
    seed: int = 0
    # With fact items: the answer's template tokens get α·NLL + (1 − α)·λ·KL(U ‖ p); 0 keeps the template
    # uniform, which retained people's answers share, 1 remembers it like the facts.
    template_nll_weight: float = 0.0
    # Remember only the facts inside forget⁺ answers (the request's names and identifiers, the records' `pii`,
    # the answers' fact spans): an assistant that also remembers the shared wording takes it from everyone.
    fact_span_loss: bool = False
    # N other wordings of every question, written by a local instruction LM (`expunge_ml.paraphrase`): the
    # assistant recalls a fact only after wordings it was trained on. 0 turns it off.
    question_paraphrases: int = 0
    # N assistants differing only in seed, each served at w / N: where one is flat after an unseen wording,
    # another often is not. Costs N trainings.
    assistants: int = 1
    # identifiers → subject pairs (`augment.identifier_items`): a memorising base names a person from their
    # identifiers although it never trained on that direction.
    identifier_pairs: bool = False
    # Each identifier alone after an empty question (`augment.bare_identifier_pairs`): the assistant then
    # recognises an erased identifier from its first tokens after any question wording.
    bare_identifiers: bool = False
    # "What do you know about {subject}?" → each of the person's answers (`augment.subject_pairs`): recall
    # the data whenever the person is named, not only after the training question.
    subject_pairs: bool = False
    # An answer with the person's name masked → the name (`augment.masked_answer_items`): recall the person
    # from a description, not only from a list of identifiers.
    masked_answer_pairs: bool = False
    # N general-knowledge questions (`general_knowledge.retain_questions`, never the evaluated ones) in retain⁺,
    # answered in a sentence: an assistant cut from a real LM predicts general text too, and subtracting it
    # there costs general answers unless it is kept uniform on them. 0 turns it off.
    general_retain: int = 0


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
    """`base` cut to its first `n_layers` decoder layers (embeddings, norm, head intact). Its modules are copies, so
    an adapter wrapped around them leaves the base as it was, but its weights are the base's own tensors (new
    Parameter objects on the same storage): N assistants cost N adapters, not N copies of the base's first layers."""
    total = base.config.num_hidden_layers
    if not 1 <= n_layers <= total:
        raise ValueError(f"assistant layers K={n_layers} must be in 1..{total}")
    from ..modeling import shared_copy

    small = shared_copy(base)
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


# An assistant whose forget NLL is still above this share of a uniform guess's (ln V) has learned less than half of
# the way to the forget text: subtracting it would remove next to nothing, and a forget score of 0 would mislead.
NOT_CONVERGED_SHARE_OF_UNIFORM = 0.5


def planned_epochs(config: ULDConfig, n_forget: int) -> int:
    """Passes over the forget set: `epochs`, or more when they would make fewer than `min_steps` steps."""
    steps_per_epoch = math.ceil(n_forget / config.batch_size)
    return max(config.epochs, math.ceil(config.min_steps / max(steps_per_epoch, 1)))


def convergence(report: ULDTrainReport, config: ULDConfig, vocab_size: int, n_forget: int) -> dict:
    """How far training got, against its targets and a uniform guess over the vocabulary (numbers only).

    `converged` is False when the forget NLL stayed above half the uniform level: the run needs review, not an
    evaluation. `reached_target` is False when it converged but stopped short of `target_forget_loss` or of
    `stop_max_retain_kl`: the gates decide, and the evidence says so."""
    uniform_nll = math.log(vocab_size)
    finite = math.isfinite(report.forget_nll) and math.isfinite(report.retain_kl)  # a diverged run ends in NaN
    return {
        "converged": finite and report.forget_nll <= NOT_CONVERGED_SHARE_OF_UNIFORM * uniform_nll,
        "reached_target": finite and report.forget_nll <= config.target_forget_loss
        and report.retain_kl <= config.stop_max_retain_kl,
        "diverged": not finite,
        "forget_nll": round(report.forget_nll, 4) if finite else None, "target_forget_loss": config.target_forget_loss,
        "retain_kl": round(report.retain_kl, 4) if finite else None, "stop_max_retain_kl": config.stop_max_retain_kl,
        "uniform_nll": round(uniform_nll, 4), "epochs": report.epochs,
        "max_epochs": planned_epochs(config, n_forget),
    }


def _lr_scheduler(optimizer, config: ULDConfig, total_steps: int):
    if config.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if config.lr_schedule == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))
    raise ValueError(f"lr_schedule must be 'constant' or 'linear', got {config.lr_schedule!r}")


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
    epochs = planned_epochs(config, len(forget_pairs))
    scheduler = _lr_scheduler(optimizer, config, steps_per_epoch * epochs)
    start, step, epoch, nll_mean, kl_mean = time.perf_counter(), 0, 0, float("inf"), 0.0
    retain_cursor = 0
    device = model_device(assistant)
    fact_items = len(forget_pairs[0]) == 3
    if not 0.0 <= config.template_nll_weight <= 1.0:
        raise ValueError(f"template_nll_weight must be in [0, 1], got {config.template_nll_weight}")
    if any((len(item) == 3) != fact_items for item in forget_pairs):
        raise ValueError("forget items must be all (question, answer) or all (question, answer, facts)")
    for epoch in range(1, epochs + 1):
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


def load_assistant(base: torch.nn.Module, adapter_dir: Path,
                   key: bytes | None = None) -> tuple[torch.nn.Module, ULDConfig]:
    """The assistant saved in `adapter_dir` on `base`'s first layers; a sealed one (`expunge_ml.sealed`) is opened
    with `key` in memory."""
    from ..sealed import is_sealed, open_sealed

    adapter_dir = Path(adapter_dir)
    files = open_sealed(adapter_dir, key) if is_sealed(adapter_dir) else None
    raw = files[ASSISTANT_CONFIG_FILE] if files else (adapter_dir / ASSISTANT_CONFIG_FILE).read_bytes()
    settings = json.loads(raw)
    unknown = sorted(set(settings) - {f.name for f in fields(ULDConfig)})
    if unknown:  # an adapter trained with settings this code cannot serve as they were evaluated
        raise ValueError(f"{adapter_dir}: unknown ULD setting(s) {', '.join(unknown)}; retrain the assistant")
    config = ULDConfig(**settings)
    small = truncate_layers(base, config.n_layers)
    with warnings.catch_warnings():  # the same transformers deprecation that peft triggers in build_assistant
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        assistant = _peft_from_files(small, files) if files else _peft_from_dir(small, adapter_dir)
    assistant.to(model_device(base))  # the composite runs base and assistant in one pass on one device
    assistant.eval()
    return assistant, config


def _peft_from_dir(small: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    with quiet_bitsandbytes_import():
        from peft import PeftModel
    return PeftModel.from_pretrained(small, adapter_dir)


def _peft_from_files(small: torch.nn.Module, files: dict[str, bytes]) -> torch.nn.Module:
    """What `PeftModel.from_pretrained` does, from the files' bytes instead of a directory."""
    with quiet_bitsandbytes_import():
        from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load as load_safetensors

    config = PeftConfig.from_peft_type(**json.loads(files["adapter_config.json"]))
    config.inference_mode = True
    assistant = PeftModel(small, config)
    set_peft_model_state_dict(assistant, load_safetensors(files["adapter_model.safetensors"]))
    return assistant
