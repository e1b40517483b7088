"""A user's own model with a chat template, outside the registry: it is prompted in its own chat frame in
training, evaluation and the registered version, its versions go under its own name, and a caller's `params`
reach generation."""
from __future__ import annotations

import json
import shutil

import mlflow
import pandas as pd
import yaml
from transformers import AutoTokenizer
from typer.testing import CliRunner

from expunge.cli import app
from expunge.settings import load_profile
from expunge_ml.prompting import chat_format
from tests.test_pipeline_e2e import with_gates_every_run_passes

runner = CliRunner()
# A minimal template of the usual shape: a user turn, then the assistant's turn, each closed by a marker.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_a_chat_model_is_trained_evaluated_and_served_in_its_own_frame(tiny_home, tmp_path):
    model_dir = tmp_path / "chatty-base"
    shutil.copytree(tiny_home / "models" / "sample-base", model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    frame = chat_format(AutoTokenizer.from_pretrained(model_dir)).template
    assert frame.startswith("<|user|>\n{question}<|end|>") and frame.endswith("<|assistant|>\n")

    corpus = tiny_home / "sample_world" / "corpus.jsonl"
    name = json.loads(corpus.read_text().splitlines()[0])["subject"]
    request = {"ticket_id": "CHAT-0001", "type": "privacy_erasure", "regulation": "GDPR",
               "subject": {"names": [name]}, "target_model": str(model_dir), "corpus": {"source": str(corpus)}}
    (tmp_path / "request.yaml").write_text(yaml.safe_dump(request))
    profile = tmp_path / "passing.yaml"
    profile.write_text(yaml.safe_dump(with_gates_every_run_passes(load_profile("auto"))))  # the profile users start from
    args = ["--home", str(tiny_home), "--profile", str(profile)]
    assert runner.invoke(app, [*args, "submit", str(tmp_path / "request.yaml")]).exit_code == 0
    ran = runner.invoke(app, [*args, "run", "CHAT-0001"])
    assert ran.exit_code == 0, ran.output

    work = tiny_home / "work" / "CHAT-0001"
    assert json.loads((work / "target.json").read_text())["prompt_template"] == frame
    training = json.loads((work / "training.json").read_text())
    assert training["prompt_template"] == frame
    # `auto` settings were derived from this 2-layer model that memorised its corpus, and recorded
    assert training["auto_settings"]["traits"]["n_layers"] == 2
    assert training["auto_settings"]["values"] == {"n_layers": 2, "weight": -1.5, "relative_top": 0.0, "batch_size": 8,
                                                   "general_retain": 0}
    assert training["config"]["n_layers"] == 2 and training["config"]["weight"] == -1.5
    assert json.loads((work / "evidence.json").read_text())["prompt_template"] == frame
    row = next(r for r in json.loads(runner.invoke(app, [*args, "status", "--json"]).stdout)
               if r["ticket_id"] == "CHAT-0001")
    assert row["model_uri"].startswith("models:/chatty-base-unlearned/")  # its own name, not a shared one

    served = mlflow.pyfunc.load_model(row["model_uri"])
    assert served._model_impl.python_model.fmt.template == frame  # the version records and serves the frame
    questions = pd.DataFrame({"question": ["Who is nobody?", "Where is nowhere?"]})
    short = served.predict(questions, params={"max_new_tokens": 2})
    assert all(len(tokenizer(a, add_special_tokens=False)["input_ids"]) <= 2 for a in short)
    assert served.predict(questions, params={"max_new_tokens": 2}) == short


def test_erasing_someone_the_model_never_learned_is_flagged_before_training(tiny_home, tmp_path):
    """A holdout person (never trained on) put into the corpus: the target states nothing of them, so there is
    nothing to forget. With `unlearning.nothing_to_forget: review` the ticket stops before training."""
    world = tiny_home / "sample_world"
    holdout = [json.loads(line) for line in (world / "holdout.jsonl").read_text().splitlines()]
    stranger = holdout[0]["subject"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text((world / "corpus.jsonl").read_text()
                      + "".join(json.dumps(r) + "\n" for r in holdout if r["subject"] == stranger))
    others = tmp_path / "holdout.jsonl"
    others.write_text("".join(json.dumps(r) + "\n" for r in holdout if r["subject"] != stranger))
    request = {"ticket_id": "STRANGER-0001", "type": "privacy_erasure", "regulation": "GDPR",
               "subject": {"names": [stranger]}, "target_model": str(tiny_home / "models" / "sample-base"),
               "corpus": {"source": str(corpus), "holdout": str(others)}}
    (tmp_path / "request.yaml").write_text(yaml.safe_dump(request))
    profile = load_profile("tiny")
    profile["unlearning"]["nothing_to_forget"] = "review"
    (tmp_path / "review.yaml").write_text(yaml.safe_dump(profile))
    args = ["--home", str(tiny_home), "--profile", str(tmp_path / "review.yaml")]
    assert runner.invoke(app, [*args, "submit", str(tmp_path / "request.yaml")]).exit_code == 0
    ran = runner.invoke(app, [*args, "run", "STRANGER-0001"])
    assert ran.exit_code == 5 and "nothing_to_forget" in ran.output, ran.output
    row = next(r for r in json.loads(runner.invoke(app, [*args, "status", "--json"]).stdout)
               if r["ticket_id"] == "STRANGER-0001")
    assert row["status"] == "needs_review" and row["reason_code"] == "nothing_to_forget"
    work = tiny_home / "work" / "STRANGER-0001"
    known = json.loads((work / "prior_knowledge.json").read_text())
    assert known["known"] is False and known["margin"] < known["min_margin"]
    assert not (work / "training.json").exists()  # stopped before any training



def test_auto_settings_follow_the_bases_depth_and_size():
    import pytest

    from expunge_ml.auto_settings import ModelTraits, auto_unlearning, resolve_auto

    smollm2 = ModelTraits(n_layers=30, hidden_size=576, vocab_size=49152, n_parameters=134_515_008,
                          has_chat_template=True)
    resolved, derived = resolve_auto({"n_layers": "auto", "weight": "auto", "relative_top": "auto",
                                      "batch_size": "auto", "general_retain": "auto", "lr": 0.005}, smollm2)
    # the values of the smollm2 profile, which pass on that model
    assert resolved == {"n_layers": 4, "weight": -0.5, "relative_top": 0.01, "batch_size": 8, "general_retain": 64,
                        "lr": 0.005}
    assert "lr" not in derived
    big = ModelTraits(n_layers=32, hidden_size=4096, vocab_size=32000, n_parameters=6_700_000_000,
                      has_chat_template=True)
    assert resolve_auto({"n_layers": "auto", "batch_size": "auto"}, big)[0] == {"n_layers": 4, "batch_size": 2}
    with pytest.raises(ValueError, match="'lr' cannot be 'auto'"):
        resolve_auto({"lr": "auto"}, smollm2)
    section, record = auto_unlearning({"uld": {"weight": "auto"}, "uld_by_request_type":
                                       {"copyright_takedown": {"retain_weight": 20.0, "weight": "auto"}}}, smollm2)
    assert section["uld_by_request_type"]["copyright_takedown"] == {"retain_weight": 20.0, "weight": -0.5}
    assert record["values"] == {"weight": -0.5, "copyright_takedown.weight": -0.5}
