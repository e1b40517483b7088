"""MLflow pyfunc (logged from code) serving a ULD composite: base + Σ w_i · assistant_i.

Only the LoRA adapters travel with this model version; the base is *referenced* by a pinned
`models:/name/version` URI and its weight hash is checked on load, so a version can never silently
run on top of a different base.
"""
from __future__ import annotations

import os
from pathlib import Path

import mlflow.pyfunc
from mlflow.models import set_model


class ULDCompositeModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from expunge_ml.logits import CompositeLogits
        from expunge_ml.methods.uld import load_assistant
        from expunge_ml.modeling import load_causal_lm, weights_fingerprint
        from expunge_ml.prompting import PromptFormat
        from models_registry.registry import local_model_dir

        config = context.model_config
        base_dir = local_model_dir(config["base_uri"])
        expected = config.get("base_weights_sha256")
        actual = weights_fingerprint(Path(base_dir)) if expected and Path(base_dir).is_dir() else expected
        if actual != expected:
            raise RuntimeError(
                f"base model {config['base_uri']} has weights {actual[:12]}…, "
                f"this version was built on {config['base_weights_sha256'][:12]}…"
            )
        base, self.tokenizer = load_causal_lm(base_dir, dtype=os.environ.get("EXPUNGE_DTYPE", "float32"),
                                           device=os.environ.get("EXPUNGE_DEVICE", "auto"))
        assistants, weights, subtractions = [], [], []
        for entry in config["assistants"]:
            assistant, uld_config = load_assistant(base, context.artifacts[entry["artifact"]])
            assistants.append(assistant)
            weights.append(float(entry.get("weight", uld_config.weight)))
            subtractions.append(uld_config.subtraction)  # as its erasure was evaluated (saved with the adapter)
        self.source = CompositeLogits(base, assistants, weights, float(config.get("relative_top", 0.0)),
                                      subtractions=subtractions)
        self.fmt = PromptFormat(template=config.get("prompt_template") or PromptFormat().template)
        self.max_new_tokens = int(config.get("max_new_tokens", 48))

    def predict(self, context, model_input, params=None):
        from models_registry.predict_io import generate_for_input

        return generate_for_input(self, model_input, params)


set_model(ULDCompositeModel())
