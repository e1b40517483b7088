"""Loading, building, copying, training and fingerprinting causal LMs (any Hugging Face causal LM).

The embedded default "production model" is a small Llama-architecture model trained from scratch on
the sample world until it memorises it — it stands for an LLM that memorised private data.
"""
from __future__ import annotations

import copy
import hashlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .devices import model_device, resolve_device, resolve_dtype, to_device
from .prompting import PromptFormat, collate_qa

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


def load_causal_lm(location: str, dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Model + tokenizer from a local directory or a hub id (hub ids need network at the user's site).
    `dtype`: a torch dtype or "float32" | "bfloat16" | "float16"; `device`: a torch device or a name for
    `devices.resolve_device` ("auto", "cpu", "cuda", "cuda:N")."""
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=resolve_dtype(dtype))
    model.to(device if isinstance(device, torch.device) else resolve_device(device))
    model.eval()
    return model, tokenizer


def shared_copy(model: torch.nn.Module, own: Iterable[torch.nn.Parameter] = ()) -> torch.nn.Module:
    """A copy of `model`'s modules whose parameters are new Parameter objects on the model's own storage (and
    whose buffers are the model's): it costs modules, not weights. Freezing, wrapping, cutting or moving the
    copy's parameters to new tensors leaves `model` as it was; writing into a shared tensor would not, so each
    parameter in `own` (those the caller will write into in place) gets a copy of its data instead."""
    owned = {id(p) for p in own}
    memo: dict[int, object] = {}
    for p in model.parameters():
        if id(p) in owned:
            memo[id(p)] = copy.deepcopy(p)
        elif type(p) is torch.nn.Parameter:
            memo[id(p)] = torch.nn.Parameter(p.data, requires_grad=p.requires_grad)
        else:  # a quantized weight (a Parameter subclass) is shared as it is: it is never trained
            memo[id(p)] = p
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos"]
    # Prompts start with BOS (as Llama tokenizers do); answers are encoded without special tokens.
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, core.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
    )


@dataclass(frozen=True)
class SmallLlamaShape:
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 256


def build_small_llama(tokenizer, shape: SmallLlamaShape, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # A separate LM head: the ULD assistant copies it and LoRA leaves it alone.
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@dataclass
class TrainReport:
    epochs: int
    steps: int
    final_loss: float
    seconds: float


def train_on_qa(
    model: torch.nn.Module,
    tokenizer,
    fmt: PromptFormat,
    pairs: Sequence[tuple[str, str]],
    *,
    epochs: int = 40,
    lr: float = 2e-3,
    batch_size: int = 16,
    target_loss: float = 0.02,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> TrainReport:
    """Fine-tune on answers (prompt tokens masked) until mean answer loss ≤ target_loss or `epochs` end.

    Stopping at a loss target rather than a fixed epoch count makes "memorised" a measured property.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(pairs) / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    warmup = max(1, total_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup)
        * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)),
    )
    order = list(range(len(pairs)))
    device = model_device(model)
    start, step, epoch_loss, epoch = time.perf_counter(), 0, float("inf"), 0
    for epoch in range(1, epochs + 1):
        rng.shuffle(order)
        losses = []
        for i in range(0, len(order), batch_size):
            batch = to_device(collate_qa(tokenizer, fmt, [pairs[j] for j in order[i : i + batch_size]]), device)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())  # summed once per epoch: no GPU sync per step
            step += 1
        epoch_loss = float(torch.stack(losses).mean())
        if progress:
            progress(epoch, epoch_loss)
        if epoch_loss <= target_loss:
            break
    model.eval()
    return TrainReport(epoch, step, epoch_loss, time.perf_counter() - start)


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 over the weight files of a saved model, in name order: pins the exact base a version used."""
    digest = hashlib.sha256()
    files = sorted(
        p for p in Path(model_dir).rglob("*") if p.suffix in {".safetensors", ".bin", ".gguf"}
    )
    if not files:
        raise FileNotFoundError(f"no weight files under {model_dir}")
    for path in files:
        digest.update(path.relative_to(model_dir).as_posix().encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
