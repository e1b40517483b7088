"""The benchmarks' trained models: tokenizers and base / oracle models cached by everything that makes them,
and the peak memory of a training step.

Shared by the TOFU, documents and UnlearnPII benchmarks. `opts` below is any benchmark options object with
the model fields of `benchmarks.tofu.TofuBenchOptions` (shape, `base_*`, `seed`, `pretrained`, `vocab_size`).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import resource
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

CACHE_VERSION = 1
MEMORY_METHOD = (
    "peak resident-set-size increase over the RSS at the start of the step, sampled every 5 ms from "
    "/proc/self/statm by a background thread (torch allocates outside Python's allocator, so tracemalloc "
    "would miss it, and getrusage's ru_maxrss is a process-lifetime high-water mark)"
)
CUDA_MEMORY_METHOD = (
    "peak CUDA memory allocated by torch during the step over what was allocated at its start "
    "(torch.cuda.max_memory_allocated after reset_peak_memory_stats); host memory is not counted"
)


def sha_key(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON: the cache key of whatever `obj` fully describes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: fall back to the high-water mark
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakRSS:
    """Context manager: peak RSS increase (MB) over the RSS at entry, sampled by a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak_mb = 0.0

    def __enter__(self) -> "PeakRSS":
        self._start = _rss_bytes()
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_mb = (self._peak - self._start) / 2**20


def peak_memory(device):
    """Peak memory of a step where it matters: GPU memory on CUDA, the process's RSS on the CPU."""
    from expunge_ml.devices import PeakDeviceMemory

    return PeakDeviceMemory(device) if device.type == "cuda" else PeakRSS()


def memory_method(device) -> str:
    """How `peak_memory` measured on `device`, for a report."""
    return CUDA_MEMORY_METHOD if device.type == "cuda" else MEMORY_METHOD


_IDENTITIES: dict[str, str] = {}


def pretrained_identity(location: str) -> str:
    """sha256 of a local model's weight files (so a cache entry never outlives the weights it was tuned
    from); a hub id stands for itself."""
    from expunge_ml.modeling import weights_fingerprint

    if location not in _IDENTITIES:
        _IDENTITIES[location] = weights_fingerprint(Path(location)) if Path(location).is_dir() else location
    return _IDENTITIES[location]


def small_llama_shape(opts):
    from expunge_ml.modeling import SmallLlamaShape

    return SmallLlamaShape(
        hidden_size=opts.hidden_size,
        intermediate_size=opts.intermediate_size,
        num_hidden_layers=opts.num_layers,
        num_attention_heads=opts.num_heads,
        max_position_embeddings=max(opts.max_length, 64) * 2,
    )


def _train_settings(opts) -> dict:
    return {
        "epochs": opts.base_epochs, "lr": opts.base_lr, "batch_size": opts.base_batch_size,
        "target_loss": opts.base_target_loss, "seed": opts.seed,
    }


def load_or_train_tokenizer(opts, pairs: Sequence[tuple[str, str]], cache: Path, log: Callable[[str], None]):
    """(tokenizer, its cache key): a BPE tokenizer fitted on `pairs` (cached by them), or a pre-trained
    model's own."""
    from transformers import AutoTokenizer

    from expunge_ml.modeling import train_bpe_tokenizer

    if opts.pretrained:  # the model's own tokenizer; the key pins the exact weights it came with
        return AutoTokenizer.from_pretrained(opts.pretrained), sha_key({"pretrained": pretrained_identity(opts.pretrained)})[:16]
    key = sha_key({"v": CACHE_VERSION, "kind": "tokenizer", "vocab": opts.vocab_size, "pairs": list(pairs)})[:16]
    path = cache / f"tokenizer-{key}"
    if (path / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(path), key
    log(f"training BPE tokenizer (vocab {opts.vocab_size}) on the benchmark's training text")
    tokenizer = train_bpe_tokenizer((f"{q} {a}" for q, a in pairs), opts.vocab_size)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path), key


def model_key(opts, pairs: list[tuple[str, str]], tokenizer_key: str, device, prompt_template: str | None) -> str:
    """The cache key of a model trained on `pairs`: tokenizer, initial weights, training settings, pairs, and
    the build (the thread count and the device change the float summation order, hence the weights)."""
    import torch

    init = {"pretrained": pretrained_identity(opts.pretrained)} if opts.pretrained else asdict(small_llama_shape(opts))
    build = {"threads": torch.get_num_threads(), "device": torch.device(device).type}
    # the QA frame adds no key, so models trained in it keep the keys they have
    template = {} if prompt_template is None else {"prompt_template": prompt_template}
    return sha_key({
        "v": CACHE_VERSION, "tokenizer": tokenizer_key, "shape": init,
        "train": _train_settings(opts), "pairs": pairs, "build": build, **template,
    })[:16]


def load_or_train_model(
    role: str, pairs: list[tuple[str, str]], tokenizer, tokenizer_key: str, opts,
    cache: Path, log: Callable[[str], None], device, prompt_template: str | None = None,
):
    """(model, meta): from the cache when the same tokenizer + shape + settings + pairs were trained before.
    `prompt_template`: how a pair is laid out for training (None: the QA frame)."""
    from transformers import AutoModelForCausalLM

    key = model_key(opts, pairs, tokenizer_key, device, prompt_template)
    path = cache / f"model-{key}"
    meta_path = path / "bench_meta.json"
    if meta_path.exists():
        model = AutoModelForCausalLM.from_pretrained(path).to(device)
        model.eval()
        meta = json.loads(meta_path.read_text())
        meta["cached"] = True
        log(f"{role}: loaded from cache {path}")
        return model, meta
    log(f"{role}: training on {len(pairs)} pairs (cache key {key})")
    model, meta = _train_model(role, pairs, tokenizer, opts, log, device, prompt_template)
    meta["key"] = key
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    meta_path.write_text(json.dumps(meta, indent=2))
    meta["cached"] = False
    return model, meta


def _train_model(role: str, pairs, tokenizer, opts, log: Callable[[str], None], device, prompt_template: str | None):
    import torch
    from transformers import AutoModelForCausalLM

    from expunge_ml.modeling import build_small_llama, train_on_qa
    from expunge_ml.prompting import PromptFormat

    if opts.pretrained:
        model = AutoModelForCausalLM.from_pretrained(opts.pretrained, dtype=torch.float32).to(device)
    else:
        model = build_small_llama(tokenizer, small_llama_shape(opts), seed=opts.seed).to(device)

    def progress(epoch: int, loss: float) -> None:
        if epoch % 5 == 0 or epoch == 1:
            log(f"  {role} epoch {epoch}: loss {loss:.4f}")

    with peak_memory(device) as mem:
        fmt = PromptFormat() if prompt_template is None else PromptFormat(template=prompt_template)
        report = train_on_qa(model, tokenizer, fmt, pairs, progress=progress, **_train_settings(opts))
    log(f"{role}: trained in {report.seconds:.0f}s ({report.epochs} epochs, final loss {report.final_loss:.4f})")
    return model, {
        "role": role, "n_pairs": len(pairs), "epochs": report.epochs, "steps": report.steps,
        "final_loss": report.final_loss, "train_seconds": report.seconds, "peak_mem_mb": mem.peak_mb,
        "device": device.type, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
