"""Input/output convention shared by the pyfunc models: questions (or raw prompts) in, answers out."""
from __future__ import annotations

from typing import Any


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
    max_new = int(params.get("max_new_tokens", model.max_new_tokens))
    return greedy_generate(model.source, model.tokenizer, prompts, max_new_tokens=max_new)
