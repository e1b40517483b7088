"""MLflow pyfunc (logged from code) serving a ULD composite: base + Σ w_i · assistant_i.

Only the LoRA adapters travel with this model version, sealed (`expunge_ml.sealed`); the base is *referenced* by a pinned
`models:/name/version` URI and its weight hash is checked on load, so a version can never silently
run on top of a different base.
"""
from __future__ import annotations

import os

import pandas as pd

import mlflow.pyfunc
from mlflow.models import set_model


class ULDCompositeModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from expunge_ml.prompting import PromptFormat
        from expunge_ml.serving import Adapter, load_base, served_model
        from models_registry.registry import adapter_key, local_model_dir

        config = context.model_config
        base, self.tokenizer = load_base(local_model_dir(config["base_uri"]), config.get("base_weights_sha256"),
                                         device=os.environ.get("EXPUNGE_DEVICE", "auto"),
                                         dtype=os.environ.get("EXPUNGE_DTYPE", "float32"))
        key = adapter_key()  # the assistants are sealed: only a process holding the deployment key serves them
        adapters = [Adapter(context.artifacts[entry["artifact"]], entry.get("weight"), key)
                    for entry in config["assistants"]]
        self.source = served_model(base, adapters, config.get("relative_top")).source()
        self.fmt = PromptFormat(template=config.get("prompt_template") or PromptFormat().template)
        from models_registry.predict_io import DEFAULT_MAX_NEW_TOKENS

        self.max_new_tokens = int(config.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        from models_registry.predict_io import generate_for_input

        return generate_for_input(self, model_input, params)


set_model(ULDCompositeModel())
