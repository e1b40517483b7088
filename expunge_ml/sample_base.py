"""The embedded default: generate the sample world and train a small Llama until it memorises it."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from .corpus import CorpusSpec, load_corpus
from .devices import resolve_device
from .evaluation import evaluate_split
from .logits import CausalLMLogits
from .modeling import SmallLlamaShape, build_small_llama, train_bpe_tokenizer, train_on_qa, weights_fingerprint
from .prompting import PromptFormat
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
) -> dict[str, Any]:
    """Train tokenizer + model on the corpus, check memorisation, save an HF model dir. Returns a report."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    records = load_corpus(CorpusSpec(source=str(corpus_path)))
    fmt = PromptFormat()
    texts = [fmt.prompt(r.question) + " " + r.answer for r in records]
    texts += [r.paraphrased_answer for r in records] + [p for r in records for p in r.perturbed_answers]
    if documents_path and Path(documents_path).exists():
        texts += [json.loads(line)["text"] for line in Path(documents_path).read_text().splitlines()]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=int(tokenizer_config.get("vocab_size", 2048)))
    model = build_small_llama(tokenizer, SmallLlamaShape(**config["shape"]), seed=0).to(resolve_device(device))
    report = train_on_qa(model, tokenizer, fmt, [r.pair for r in records], progress=progress, **config["train"])
    memorised = evaluate_split(CausalLMLogits(model), tokenizer, fmt, records, max_new_tokens=48)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    result = {
        "train": asdict(report),
        "memorisation": memorised.as_dict(),
        "weights_sha256": weights_fingerprint(out_dir),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "prompt_template": fmt.template,
    }
    minimum = float(config.get("min_rougeL_recall", 0.9))
    if memorised.rougeL_recall < minimum:
        raise MemorisationError(
            f"base reached ROUGE-L recall {memorised.rougeL_recall:.3f} on its training questions, "
            f"below the required {minimum}: train longer (base_model.train.epochs) or use a larger shape"
        )
    return result
