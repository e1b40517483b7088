"""MLflow pyfunc (logged from code) serving a plain Hugging Face causal LM stored as an artifact."""
from __future__ import annotations

import os

import pandas as pd

import mlflow.pyfunc
from mlflow.models import set_model


class CausalLMModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from expunge_ml.prompting import PromptFormat
        from expunge_ml.serving import load_base, served_model

        base, self.tokenizer = load_base(context.artifacts["hf_model"],
                                         device=os.environ.get("EXPUNGE_DEVICE", "auto"),
                                         dtype=os.environ.get("EXPUNGE_DTYPE", "float32"))
        self.source = served_model(base).source()
        config = context.model_config or {}
        self.fmt = PromptFormat(template=config.get("prompt_template") or PromptFormat().template)
        from models_registry.predict_io import DEFAULT_MAX_NEW_TOKENS

        self.max_new_tokens = int(config.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        from models_registry.predict_io import generate_for_input

        return generate_for_input(self, model_input, params)


set_model(CausalLMModel())
