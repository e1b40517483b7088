"""Bootstrap the embedded default model: the stand-in for "a production LLM that memorised private data"."""
from __future__ import annotations

from prefect import flow

from tasks.bootstrap import build_world, find_existing_base, register_base, train_base


@flow(name="bootstrap_sample_model")
def bootstrap_sample_model(home: str, profile: str = "demo", force: bool = False) -> dict:
    existing = None if force else find_existing_base(home, profile)
    world = build_world(home, profile)  # deterministic: rewriting it is cheap and keeps files present
    if existing:
        return {"model_uri": existing, "reused": True, "world": world}
    trained = train_base(home, profile, world)
    uri = register_base(home, profile, world, trained)
    return {"model_uri": uri, "reused": False, "world": world, "memorisation": trained["memorisation"]}
