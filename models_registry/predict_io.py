"""Input/output convention shared by the pyfunc models: questions (or raw prompts) in, answers out."""
from __future__ import annotations

from typing import Any

DEFAULT_MAX_NEW_TOKENS = 48  # a version's answer length when neither its config nor the caller's params set one


def generate_for_input(model: Any, model_input: Any, params: dict | None = None) -> list[str]:
    """Accepts a DataFrame with a `question` or `prompt` column, a list of strings, or one string."""
    from expunge_ml.generation import greedy_generate

    params = params or {}
    if hasattr(model_input, "columns"):
        if "question" in model_input.columns:
            prompts = [model.fmt.prompt(q) for q in model_input["question"].astype(str)]
        elif "prompt" in model_input.columns:
            prompts = list(model_input["prompt"].astype(str))
        else:
            raise ValueError("input needs a 'question' or 'prompt' column")
    elif isinstance(model_input, str):
        prompts = [model.fmt.prompt(model_input)]
    else:
        prompts = [model.fmt.prompt(str(q)) for q in model_input]
    max_new = int(params.get("max_new_tokens") or model.max_new_tokens)
    return greedy_generate(model.source, model.tokenizer, prompts, max_new_tokens=max_new,
                           temperature=float(params.get("temperature") or 0.0), seed=int(params.get("seed") or 0))


def serving_signature(max_new_tokens: int):
    """What a version takes: a `question` column (asked in the version's prompt frame) or a `prompt` column
    (sent as written); params `max_new_tokens`, `temperature` (0: greedy) and `seed` (for sampling)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "question", required=False), ColSpec("string", "prompt", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", max_new_tokens),
                            ParamSpec("temperature", "double", 0.0), ParamSpec("seed", "long", 0)]),
    )
