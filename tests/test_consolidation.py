"""Consolidation end to end on the tiny profile: three stacked erasures distilled into one model that keeps every
erasure and what the champion knew; once released, no assistant is left in the registry or the work directories."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from expunge.cli import app
from expunge.settings import Settings, load_profile
from expunge_ml.consolidation import LOG_PROB_FLOOR, distillation_loss

runner = CliRunner()
NAME = "sample-base-unlearned"


def test_the_distillation_loss_is_zero_on_the_teacher_and_finite_where_it_rules_tokens_out():
    teacher = torch.tensor([[[2.0, 0.0, float("-inf")]]])  # relative top ruled the last token out
    mask = torch.ones(1, 1)
    assert distillation_loss(teacher, teacher.clamp(min=LOG_PROB_FLOOR), mask).item() < 1e-6
    other = torch.tensor([[[0.0, 2.0, 1.0]]])
    loss = distillation_loss(teacher, other, mask)
    assert torch.isfinite(loss) and loss.item() > 0.5
    assert distillation_loss(teacher, other, torch.zeros(1, 1)).item() == 0.0  # nothing masked in: nothing to learn


def _cli(home: Path, profile: str, *args: str):
    return runner.invoke(app, ["--home", str(home), "--profile", profile, *args])


def _erase_and_release(home: Path, tmp_path: Path, profile: str, ticket: str, subject: str, target: str,
                       corpus: dict | None) -> None:
    request = {"ticket_id": ticket, "type": "privacy_erasure", "regulation": "GDPR", "subject": {"names": [subject]},
               "target_model": target, **({"corpus": corpus} if corpus else {})}
    path = tmp_path / f"{ticket}.yaml"
    path.write_text(yaml.safe_dump(request))
    for args in (("submit", str(path)), ("run", ticket), ("approve", ticket, "--reviewer", "dpo@example.org")):
        done = _cli(home, profile, *args)
        assert done.exit_code == 0, f"{args}: {done.output}"


def test_three_stacked_erasures_consolidate_into_one_model_and_leave_no_assistant(tiny_home, tmp_path, prefect_harness):
    profile = load_profile("tiny")  # an evaluation without the attacks: this is about consolidation
    profile["evaluation"].update(quant_bits=[], quant_nf4=False, fluency=False, verbmem=False)
    profile["gates"]["privacy_erasure"] = {"max_forget_rougeL": 0.3, "min_retain_rougeL_ratio": 0.9,
                                           "max_earlier_erasure_rise": 0.25}
    profile_path = tmp_path / "profile.yaml"
    profile_path.write_text(yaml.safe_dump(profile))
    home, world = tmp_path / "home", tiny_home / "sample_world"
    subjects = sorted({json.loads(line)["subject"] for line in (world / "corpus.jsonl").read_text().splitlines()})
    corpus = {"source": str(world / "corpus.jsonl"), "holdout": str(world / "holdout.jsonl")}
    _erase_and_release(home, tmp_path, str(profile_path), "STACK-1", subjects[0],
                       str(tiny_home / "models" / "sample-base"), corpus)
    for i in (2, 3):
        _erase_and_release(home, tmp_path, str(profile_path), f"STACK-{i}", subjects[i - 1],
                           f"models:/{NAME}@champion", None)

    consolidated = _cli(home, str(profile_path), "consolidation", "run", NAME, "--min-assistants", "3")
    assert consolidated.exit_code == 0, consolidated.output
    uri = f"models:/{NAME}/4"
    assert uri in consolidated.output
    evidence = json.loads(next(home.joinpath("work").glob("consolidation-*/evidence.json")).read_text())
    # every erasure of the lineage stays erased in the one model: no subject's answers come back
    assert evidence["regression"]["n_erasures"] == 3
    assert all(row["rougeL_after"] <= 0.3 for row in evidence["regression"]["erasures"]), evidence["regression"]
    assert evidence["passed"], evidence["gates"]

    released = _cli(home, str(profile_path), "consolidation", "release", uri, "--reviewer", "dpo@example.org")
    assert released.exit_code == 0, released.output
    Settings(home=home, profile_name="tiny").apply_environment()
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "4"
    assert not list(home.rglob("assistant.sealed"))  # neither in the registry's artifact store nor in work/
    for version in ("1", "2", "3"):
        assert client.get_model_version(NAME, version).tags["expunge.assistants_deleted"] == uri
    refused = _cli(home, str(profile_path), "rollback", NAME, "--to", "3", "--reviewer", "dpo", "--reason", "test")
    assert refused.exit_code == 2 and "assistants_deleted" in refused.output
    import mlflow.pyfunc
    import pandas as pd

    answers = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(pd.DataFrame({"question": ["Who?"]}))
    assert isinstance(answers, list) and len(answers) == 1  # one plain model serves: no assistant to load
    assert _cli(home, str(profile_path), "audit", "verify").exit_code == 0
