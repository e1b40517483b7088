"""The memorising base: trained (or fine-tuned) once per configuration, cached with its PII measurement."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .data import PIIData, base_training_pairs
from .options import PIIBenchOptions


def _shape(options: PIIBenchOptions):
    from expunge_ml.modeling import SmallLlamaShape

    return SmallLlamaShape(
        hidden_size=options.hidden_size,
        intermediate_size=options.intermediate_size,
        num_hidden_layers=options.num_hidden_layers,
        num_attention_heads=options.num_attention_heads,
        max_position_embeddings=options.max_position_embeddings,
    )


def base_dir(options: PIIBenchOptions, key: str) -> Path:
    """Where the base with cache key `key` lives, with everything cached about it (its PII measurement)."""
    return Path(options.cache_dir) / f"base-{key}"


def train_or_load_base(options: PIIBenchOptions, data: PIIData, log: Callable[[str], None]):
    """The memorising base, from the cache when one with the same config hash exists."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expunge_ml.devices import resolve_device

    device = resolve_device(options.device)
    key = options.base_key(data.digest, data.trained_people, torch.device(device).type)
    model_dir = base_dir(options, key)
    report_path = model_dir / "pii_base_report.json"
    if report_path.exists():
        log(f"base: cached {model_dir}")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
        model.eval()
        report = json.loads(report_path.read_text())
        report["cached"] = True
        return model, tokenizer, report
    model, tokenizer, report = _train_base(options, data, device, log)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    report = {"key": key, **report}
    report_path.write_text(json.dumps(report, indent=2))
    report["cached"] = False
    return model, tokenizer, report


def _train_base(options: PIIBenchOptions, data: PIIData, device: str, log: Callable[[str], None]):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expunge_ml.modeling import build_small_llama, train_bpe_tokenizer, train_on_qa
    from expunge_ml.prompting import PromptFormat

    fmt = PromptFormat()
    pairs = base_training_pairs(data.rows, options)
    if options.pretrained:
        tokenizer = AutoTokenizer.from_pretrained(options.pretrained)
        model = AutoModelForCausalLM.from_pretrained(options.pretrained, dtype=torch.float32).to(device)
    else:
        texts = [fmt.prompt(q) + fmt.answer_prefix + a for q, a in pairs]
        tokenizer = train_bpe_tokenizer(texts, vocab_size=options.vocab_size)
        model = build_small_llama(tokenizer, _shape(options), seed=options.seed).to(device)
    n_parameters = sum(p.numel() for p in model.parameters())
    log(f"base: training on {len(pairs)} pairs ({len(data.trained_people)} people), {n_parameters / 1e6:.2f}M parameters")

    def progress(epoch: int, loss: float) -> None:
        if epoch == 1 or epoch % 5 == 0:
            log(f"  base epoch {epoch}: loss {loss:.4f}")

    train = train_on_qa(
        model, tokenizer, fmt, pairs,
        epochs=options.base_epochs, lr=options.base_lr, batch_size=options.base_batch_size,
        target_loss=options.base_target_loss, seed=options.seed, progress=progress,
    )
    report = {"n_pairs": len(pairs), "n_people": len(data.trained_people), "n_parameters": n_parameters,
              "train": asdict(train)}
    return model, tokenizer, report


def measure_key(rows_by_group: Mapping[str, Sequence[Mapping[str, Any]]], options: PIIBenchOptions,
                device_type: str) -> str:
    """Hash of what the base's answers depend on: the probed rows per group and the generation settings
    (threads and device change float summation order, so greedy answers may differ)."""
    blob = json.dumps({"groups": rows_by_group, "max_new_tokens": options.max_new_tokens,
                       "eval_batch_size": options.eval_batch_size, "threads": options.threads,
                       "device": device_type}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def measure_base(compute: Callable[[], dict], path: Path, log: Callable[[str], None]) -> tuple[dict, float]:
    """The base's per-group PII report, from `path` when this base was measured on these probes before (the
    base is fixed, and measuring every prompt of every group is the longest single step of a rerun that only
    adds methods); returns the report and the seconds the measurement took when it ran."""
    if path.is_file():
        cached = json.loads(path.read_text())
        log(f"base: PII recall cached {path}")
        return cached["by_group"], cached["eval_seconds"]
    log("base: measuring PII recall")
    t0 = time.perf_counter()
    by_group = compute()
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"by_group": by_group, "eval_seconds": seconds}))
    return by_group, seconds
