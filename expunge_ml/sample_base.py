"""The embedded default: generate the sample world and teach it to a model until it answers it.

The model is a small Llama trained from scratch (`shape`: the demo and tiny profiles), or a pre-trained LM
fine-tuned on the world (`base_model.pretrained`: the smollm2 profile, as TOFU teaches its fictitious authors to a
real LM)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from .corpus import CorpusSpec, load_corpus
from .devices import resolve_device
from .evaluation import evaluate_split
from .general_knowledge import select_known, write_general
from .logits import CausalLMLogits
from .modeling import (SmallLlamaShape, build_small_llama, load_causal_lm, train_bpe_tokenizer, train_on_qa,
                       weights_fingerprint)
from .prompting import PromptFormat, chat_format
from .world import generate_holdout, generate_world, write_holdout, write_world


class MemorisationError(RuntimeError):
    """The base did not memorise its corpus: erasing from it would prove nothing."""


def build_sample_world(config: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write the world; with `n_holdout_people`, also holdout.jsonl (people the base never sees, for MIA)."""
    config = dict(config)
    n_holdout = int(config.pop("n_holdout_people", 0))
    world = generate_world(**config)
    paths = write_world(world, out_dir)
    if n_holdout:
        paths["holdout"] = write_holdout(
            generate_holdout(world, n_holdout, int(config.get("qa_per_person", 12))), out_dir)
    return paths


def train_sample_base(
    corpus_path: Path,
    documents_path: Path | None,
    config: dict[str, Any],
    tokenizer_config: dict[str, Any],
    out_dir: Path,
    progress: Callable[[int, float], None] | None = None,
    device: str = "cpu",
    pretrained: str | None = None,
    general_path: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune `pretrained` (a local model directory) on the corpus, or train a tokenizer + small Llama from
    scratch when it is None; check memorisation, save an HF model dir. Returns a report. With `pretrained` and
    `general_path`, first write there the general questions the pre-trained model answers (`general_knowledge`)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    records = load_corpus(CorpusSpec(source=str(corpus_path)))
    fmt, general = PromptFormat(), []
    if pretrained:
        model, tokenizer = load_causal_lm(pretrained, device=device)
        fmt = chat_format(tokenizer) or fmt
        if general_path is not None:  # chosen before the world is taught: what the pre-trained model knew
            general = select_known(model, tokenizer, fmt, int(config.get("general_questions", 48)))
            write_general(general, general_path)
    else:
        tokenizer = _world_tokenizer(records, documents_path, fmt, int(tokenizer_config.get("vocab_size", 2048)))
        model = build_small_llama(tokenizer, SmallLlamaShape(**config["shape"]), seed=0).to(resolve_device(device))
    train = dict(config["train"])
    top_layers = train.pop("trainable_top_layers", None)
    if top_layers is not None:
        freeze_below_top_layers(model, int(top_layers))
    report = train_on_qa(model, tokenizer, fmt, [r.pair for r in records], progress=progress, **train)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    memorised = evaluate_split(CausalLMLogits(model), tokenizer, fmt, records, max_new_tokens=48)
    kept = evaluate_split(CausalLMLogits(model), tokenizer, fmt, general, max_new_tokens=32) if general else None
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    result = {
        "train": asdict(report),
        "memorisation": memorised.as_dict(),
        "weights_sha256": weights_fingerprint(out_dir),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "pretrained": bool(pretrained),
        # the general questions the pre-trained model answered, and the share of them the taught base still does
        "general": None if kept is None else {"n": len(general), "rougeL_recall": kept.rougeL_recall},
        "prompt_template": fmt.template,
    }
    minimum = float(config.get("min_rougeL_recall", 0.9))
    if memorised.rougeL_recall < minimum:
        raise MemorisationError(
            f"base reached ROUGE-L recall {memorised.rougeL_recall:.3f} on its training questions, "
            f"below the required {minimum}: train longer (base_model.train.epochs) or use a larger shape"
        )
    return result


def _world_tokenizer(records, documents_path: Path | None, fmt: PromptFormat, vocab_size: int):
    """A BPE tokenizer fitted on the world's text, for a model trained from scratch."""
    texts = [fmt.prompt(r.question) + " " + r.answer for r in records]
    texts += [r.paraphrased_answer for r in records] + [p for r in records for p in r.perturbed_answers]
    if documents_path and Path(documents_path).exists():
        texts += [json.loads(line)["text"] for line in Path(documents_path).read_text().splitlines()]
    return train_bpe_tokenizer(texts, vocab_size=vocab_size)


def freeze_below_top_layers(model: torch.nn.Module, n_top: int) -> None:
    """Train only the top `n_top` decoder layers and the final norm: a pre-trained model learns the world's facts
    there in a fraction of the compute (no gradient flows below them), and what its lower layers know stays."""
    layers = model.get_decoder().layers
    if not 0 < n_top <= len(layers):
        raise ValueError(f"base_model.train.trainable_top_layers must be in 1..{len(layers)}, got {n_top}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in [*layers[len(layers) - n_top:], model.get_decoder().norm]:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
