"""One request end to end on real components: SQLite audit DB, MLflow store, Prefect test server."""
from __future__ import annotations

import json
import re
import shutil
import sqlite3
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from expunge.cli import app
from expunge.settings import Settings
from expunge_ml.sealed import open_sealed

runner = CliRunner()


def cli(home: Path, *args: str):
    return runner.invoke(app, ["--home", str(home), "--profile", "tiny", *args])


def test_request_completes_with_forgetting_and_utility_kept(tiny_home, completed):
    status = cli(tiny_home, "status", "--json")
    assert status.exit_code == 0
    row = next(r for r in json.loads(status.stdout) if r["ticket_id"] == "DEMO-GDPR-0001")
    assert row["status"] == "completed"
    assert [h["to"] for h in row["history"]] == [
        "received", "resolving", "training", "evaluating", "registering", "completed",
    ]
    m = row["metrics"]
    assert m["base_forget_rougeL"] >= 0.9  # the base really knew the subject …
    assert m["unlearned_forget_rougeL"] <= 0.3  # … and the served model no longer does
    assert m["unlearned_retain_rougeL"] >= 0.9 * m["base_retain_rougeL"]
    assert m["unlearned_forget_facts"] < m["base_forget_facts"]  # the key numbers include fact recall
    assert row["due_at"][:7] != row["received_at"][:7] or row["due_at"][:4] != row["received_at"][:4]


def test_the_subject_was_known_before_training(tiny_home, completed):
    """The sample person's facts are what the base states above its level on people it never saw: something to
    forget, measured before training (the nothing-to-forget case: tests/test_own_model.py)."""
    known = json.loads((tiny_home / "work" / "DEMO-GDPR-0001" / "prior_knowledge.json").read_text())
    assert known["known"] is True and known["metric"] == "fact_recall" and known["margin"] > 2 * known["min_margin"]
    evidence = json.loads((tiny_home / "work" / "DEMO-GDPR-0001" / "evidence.json").read_text())
    assert evidence["prior_knowledge"] == known


def test_evidence_counts_the_subjects_facts_as_well_as_the_wording(tiny_home, completed):
    evidence = json.loads((tiny_home / "work" / "DEMO-GDPR-0001" / "evidence.json").read_text())
    base, unlearned = (evidence["metrics"][m]["forget"] for m in ("base", "unlearned"))
    assert base["n_facts"] > 0 and base["n_facts"] == unlearned["n_facts"]
    assert base["fact_recall"] >= 0.8  # the base states the subject's facts …
    assert unlearned["fact_recall"] < base["fact_recall"] / 2  # … the served model far fewer of them
    for attack in evidence["quantization"].values():
        assert attack["forget"]["n_facts"] == base["n_facts"] and "fact_recovery" in attack
        low, high = attack["recovery_interval"]  # a bootstrap interval over the forget records around the value
        assert 0.0 <= low <= high <= 1.0 and "fact_recovery_interval" in attack
        # the erased person's identifiers are asked again of each quantized copy, in every wording
        assert {k: attack["pii_erased"][k]["n_identifiers"] for k in ("direct", "paraphrased", "inverted")} == {
            k: evidence["pii"]["erased"]["unlearned"][k]["n_identifiers"] for k in ("direct", "paraphrased", "inverted")}
    # answers about the retained people are read for the erased person's names
    assert all("answers_naming_watched" in kind for kind in evidence["pii"]["retained"]["unlearned"].values())
    # the answers to the forget questions are checked for degeneration too, base vs unlearned (numbers only)
    for model in ("base", "unlearned"):
        forget_fluency = evidence["fluency_forget"][model]
        assert forget_fluency["n_prompts"] == base["n"] and forget_fluency["reference_perplexity"] > 0
    assert evidence["fluency_forget"]["base"]["reference_perplexity"] < evidence["fluency"]["base"]["reference_perplexity"]
    # the subject's facts in any answer about them, beside the other people's facts in the same answers
    anywhere = evidence["facts_anywhere"]
    assert anywhere["base"]["n_facts"] == anywhere["unlearned"]["n_facts"] > 0
    assert anywhere["base"]["rate"] >= 0.8 and anywhere["unlearned"]["stated"] <= anywhere["base"]["stated"]
    assert anywhere["base"]["others"]["n_people"] > 0 and anywhere["base"]["others"]["n_facts"] > 0


def test_membership_evidence_flags_a_holdout_the_tokenizer_splits_differently(tiny_home, completed, tmp_path):
    """The sample world's tokenizer is fitted on the trained people only, so it splits the held-out people's
    answers into more pieces; the evidence records both rates and the report says the reference is unsound."""
    mia = json.loads((tiny_home / "work" / "DEMO-GDPR-0001" / "evidence.json").read_text())["muse"]["base"]["mia"]
    tpc = mia["answer_tokens_per_char"]
    assert tpc["holdout"] > 1.1 * tpc["members"] and mia["tokenisation_matches"] is False
    assert cli(tiny_home, "report", "DEMO-GDPR-0001", "--out", str(tmp_path / "r")).exit_code == 0
    assert "not exchangeable" in (tmp_path / "r" / "evidence.md").read_text()


def test_registered_version_loads_by_alias_and_generates(tiny_settings, completed):
    client = MlflowClient()
    version = client.get_model_version_by_alias("expunge-sample-llm", "challenger")
    champion = client.get_model_version_by_alias("expunge-sample-llm", "champion")
    assert version.version != champion.version
    assert version.tags["expunge.ticket_id"] == "DEMO-GDPR-0001"
    assert version.tags["expunge.method"] == "uld" and len(version.tags["expunge.forget_fingerprint"]) == 64
    import warnings

    import pandas as pd

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model("models:/expunge-sample-llm@challenger")
    assert not [w for w in caught if "type hint" in str(w.message)]
    questions = pd.DataFrame({"question": ["What is the weather like?", "Who are you?"]})
    answers = model.predict(questions)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # The signature's params reach generation: one new token, or a seeded draw at a temperature.
    params = model.metadata.get_params_schema()
    assert {p.name for p in params.params} == {"max_new_tokens", "temperature", "seed"}
    short = model.predict(questions, params={"max_new_tokens": 1})
    assert all(len(model._model_impl.python_model.tokenizer(a, add_special_tokens=False)["input_ids"]) <= 1
               for a in short) and short != answers
    sampled = model.predict(questions, params={"temperature": 5.0, "seed": 3})
    assert sampled == model.predict(questions, params={"temperature": 5.0, "seed": 3}) and sampled != answers
    # The version bundles only the adapter and references the base by pinned URI + weight hash.
    local = Path(mlflow.artifacts.download_artifacts(f"models:/expunge-sample-llm/{version.version}"))
    assert not list(local.rglob("model.safetensors"))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    from models_registry.registry import model_config_of

    model_config = model_config_of(mlmodel["flavors"]["python_function"])
    assert model_config["base_uri"] == f"models:/expunge-sample-llm/{champion.version}"
    assert model_config["base_weights_sha256"] == champion.tags["expunge.weights_sha256"]


def test_the_served_model_runs_on_the_pinned_base_with_each_assistants_w(tiny_home, tiny_settings, completed):
    """`expunge_ml.serving`, which the tasks and the registered version share: a base whose weights differ from the
    pinned hash is refused; an assistant is served at its recorded w, or at its own where none is recorded."""
    from expunge_ml.serving import Adapter, BaseWeightsMismatch, load_base, served_model

    work = tiny_home / "work" / "DEMO-GDPR-0001"
    target = json.loads((work / "target.json").read_text())
    training = json.loads((work / "training.json").read_text())
    with pytest.raises(BaseWeightsMismatch, match="pinned 000000000000"):
        load_base(target["base_location"], "0" * 64)
    base, _ = load_base(target["base_location"], target["base_weights_sha256"])
    [adapter_dir] = training["adapter_dirs"]
    key = tiny_settings.adapter_seal_key()
    assert served_model(base, [Adapter(adapter_dir, key=key)]).weights == [training["config"]["weight"]]
    recorded = served_model(base, [Adapter(adapter_dir, -0.25, key)])
    assert recorded.weights == [-0.25] and recorded.relative_top == training["config"]["relative_top"]
    assert served_model(base).assistants == []


def test_audit_chain_verifies_and_detects_tampering(tiny_home, completed, tmp_path):
    ok = cli(tiny_home, "audit", "verify")
    assert ok.exit_code == 0 and "audit chain OK" in ok.stdout
    events, sealed = re.search(r"OK: (\d+) events.*; (\d+) seals checked", ok.stdout).groups()
    assert events == sealed and "before sealing" not in ok.stdout  # the product seals every event it writes
    _a_forged_event_with_a_recomputed_hash_fails(tiny_home, tmp_path / "forged")
    tampered_home = tmp_path / "tampered"
    shutil.copytree(tiny_home, tampered_home, ignore=shutil.ignore_patterns("mlartifacts", "models"))
    with sqlite3.connect(tampered_home / "audit.db") as db:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):  # the database itself refuses ...
            db.execute("DELETE FROM audit_events WHERE seq = 1")
        db.execute("DROP TRIGGER audit_events_no_update")  # ... until a forger with admin rights drops its guard
        db.execute("UPDATE audit_events SET payload_json = replace(payload_json, 'completed', 'rejected') "
                   "WHERE event_type = 'status_changed' AND payload_json LIKE '%completed%'")
    broken = cli(tampered_home, "audit", "verify")
    assert broken.exit_code == 1
    assert "hash mismatch" in broken.stderr and "Traceback" not in broken.output


def _a_forged_event_with_a_recomputed_hash_fails(tiny_home, forged_home):
    """A forger who can write the tables (but holds no deployment key) appends a release with a correct hash."""
    from db.audit import compute_hash

    shutil.copytree(tiny_home, forged_home, ignore=shutil.ignore_patterns("mlartifacts", "models"))
    with sqlite3.connect(forged_home / "audit.db") as db:
        seq, head, ticket = db.execute("SELECT seq, hash, ticket_id FROM audit_events ORDER BY seq DESC").fetchone()
        created_at = "2026-01-01T00:00:00.000000+00:00"
        forged = compute_hash(head, seq=seq + 1, ticket_id=ticket, event_type="request_released", payload={},
                              created_at=created_at)
        db.execute("INSERT INTO audit_events VALUES (?, ?, 'request_released', '{}', ?, ?, ?, NULL)",
                   (seq + 1, ticket, created_at, head, forged))
    broken = cli(forged_home, "audit", "verify")
    assert broken.exit_code == 1 and f"event {seq + 1}: not sealed" in broken.stderr, broken.output


def test_no_subject_identifier_or_forget_text_leaves_the_operational_db(tiny_home, tiny_settings, completed):
    """Audit log, MLflow params/tags/artifacts and work manifests hold ids, counts and keyed hashes only."""
    subject = completed["subject"]
    secrets = [*subject["names"], *subject["aliases"], *subject["identifiers"]]
    corpus = [json.loads(line) for line in (tiny_home / "sample_world" / "corpus.jsonl").read_text().splitlines()]
    name = subject["names"][0]
    secrets += [r["answer"] for r in corpus if r["subject"] == name]
    places: dict[str, str] = {}
    with sqlite3.connect(tiny_home / "audit.db") as db:
        places["audit_log"] = "\n".join(row[0] for row in db.execute("SELECT payload_json FROM audit_events"))
    client = MlflowClient()
    version = client.get_model_version_by_alias("expunge-sample-llm", "challenger")
    run = client.get_run(version.run_id) if version.run_id else None
    places["version_tags"] = json.dumps(version.tags)
    if run is not None:
        places["run_params"] = json.dumps(run.data.params) + json.dumps(run.data.tags)
        local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="evidence"))
        places["run_artifacts"] = "\n".join(p.read_text() for p in local.rglob("*.json"))
    work = tiny_home / "work" / "DEMO-GDPR-0001"
    places["work_json"] = "\n".join(p.read_text() for p in work.glob("*.json"))
    assert run is not None and '"fingerprint"' in places["run_artifacts"]  # the evidence was really read
    for where, text in places.items():
        for secret in secrets:
            assert secret.casefold() not in text.casefold(), f"{where} contains private text"


def test_resubmitting_the_same_ticket_is_idempotent(tiny_home, completed):
    again = cli(tiny_home, "submit", str(tiny_home / "sample_world" / "sample_request.yaml"))
    assert again.exit_code == 3
    assert "already submitted" in again.stderr and "not queued again" in again.stderr
    rows = json.loads(cli(tiny_home, "status", "--json").stdout)
    assert [r["ticket_id"] for r in rows].count("DEMO-GDPR-0001") == 1
    rerun = cli(tiny_home, "run", "DEMO-GDPR-0001")
    assert rerun.exit_code == 2 and "is completed, not received; nothing to run" in rerun.stderr


def test_evidence_report_is_written_and_holds_no_private_text(tiny_home, completed, tmp_path):
    result = cli(tiny_home, "report", "DEMO-GDPR-0001", "--out", str(tmp_path / "report"))
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "report" / "evidence.md").read_text()
    assert "| max_forget_rougeL |" in markdown and "Audit chain head" in markdown
    assert "worst attack's 90 % interval" in markdown and "answers naming an erased person" in markdown
    assert "| PII erased, int4 attack | leak rate direct" in markdown
    assert "answers stating a retained person's identifier" in markdown
    assert (tmp_path / "report" / "metrics_before_after.png").stat().st_size > 10_000
    report = json.loads((tmp_path / "report" / "evidence_report.json").read_text())
    assert report["passed"] is True and report["registration"]["aliases"] == ["challenger"]
    # the tiny profile trains on the world's paraphrased answers: the report says the truth ratios share them
    assert report["training"]["method"] == "uld" and report["training"]["augmentation"] == "corpus"
    assert report["training"]["truth_ratio_texts_trained_on"] is True
    assert "augmentation `corpus`" in markdown and "not independent evidence" in markdown
    for secret in [*completed["subject"]["names"], *completed["subject"]["identifiers"]]:
        assert secret not in markdown and secret not in json.dumps(report)


def tiny_profile() -> dict:
    return yaml.safe_load((Path(__file__).resolve().parents[1] / "expunge/profiles/tiny.yaml").read_text())


def with_gates_every_run_passes(profile: dict) -> dict:
    """`profile` with gates no outcome can fail (forget ROUGE-L recall <= 1, retain ratio >= 0): a run under it
    completes, for tests about what a run records rather than about its thresholds."""
    return {**profile, "gates": {kind: {"max_forget_rougeL": 1.0, "min_retain_rougeL_ratio": 0.0}
                                 for kind in profile["gates"]}}


def run_with_profile(home: Path, tmp_path: Path, profile: dict, request: dict, exit_code: int) -> list[str]:
    """Submit `request` and run it under `profile`, expecting `exit_code` (0 completed, 5 failed_gates);
    returns the CLI's leading arguments for that profile."""
    profile_path = tmp_path / f"{request['ticket_id']}-profile.yaml"
    profile_path.write_text(yaml.safe_dump(profile))
    request_path = tmp_path / f"{request['ticket_id']}-request.yaml"
    request_path.write_text(yaml.safe_dump(request))
    args = ["--home", str(home), "--profile", str(profile_path)]
    assert runner.invoke(app, [*args, "submit", str(request_path)]).exit_code == 0
    ran = runner.invoke(app, [*args, "run", request["ticket_id"]])
    assert ran.exit_code == exit_code, ran.output
    return args


def test_weak_unlearning_fails_its_gates_and_is_not_promoted(tiny_home, completed, tmp_path):
    """A deliberately weak run (one epoch, tiny negative weight) must end in failed_gates, unpromoted."""
    profile = tiny_profile()
    profile["unlearning"]["uld"].update(epochs=1, weight=-0.05, lr=1e-4)
    run_with_profile(tiny_home, tmp_path, profile, dict(completed, ticket_id="WEAK-0001"), exit_code=5)
    row = next(r for r in json.loads(cli(tiny_home, "status", "--json").stdout) if r["ticket_id"] == "WEAK-0001")
    assert row["status"] == "failed_gates" and row["reason_code"] == "gate_failed"
    assert "max_forget_rougeL" in row["reason"]
    version = MlflowClient().get_model_version(*row["model_uri"].removeprefix("models:/").split("/"))
    assert "challenger" not in version.aliases and version.tags["expunge.gates"] == "failed"
    with sqlite3.connect(tiny_home / "audit.db") as db:
        payloads = [json.loads(p) for (p,) in db.execute(
            "SELECT payload_json FROM audit_events WHERE ticket_id = 'WEAK-0001' ORDER BY seq")]
    failed = next(p for p in payloads if p.get("to") == "failed_gates")
    assert any(g["gate"] == "max_forget_rougeL" and g["margin"] < 0 for g in failed["failed_gates"])


def test_an_assistant_that_did_not_converge_ends_in_review_with_its_numbers(tiny_home, completed, tmp_path):
    """A diverged assistant (an lr far too high) learns nothing of the forget set: the run stops before
    evaluation, in needs_review with reason assistant_not_converged and the losses that show it."""
    profile = tiny_profile()
    profile["unlearning"]["uld"].update(epochs=2, lr=50.0)
    run_with_profile(tiny_home, tmp_path, profile, dict(completed, ticket_id="DIVERGED-0001"), exit_code=5)
    row = next(r for r in json.loads(cli(tiny_home, "status", "--json").stdout) if r["ticket_id"] == "DIVERGED-0001")
    assert row["status"] == "needs_review" and row["reason_code"] == "assistant_not_converged"
    assert "forget NLL" in row["reason"] and "uniform guess" in row["reason"]
    assert row["model_uri"] is None  # nothing was evaluated or registered
    training = json.loads((tiny_home / "work" / "DIVERGED-0001" / "training.json").read_text())
    (check,) = training["convergence"]
    assert not check["converged"] and check["diverged"] and check["forget_nll"] is None


def test_a_privacy_erasure_can_train_on_the_requests_facts_only(tiny_home, completed, tmp_path):
    """`uld_by_request_type.privacy_erasure.fact_span_loss`: the task labels the forget answers with the request's
    terms (in memory only); the training record and the report say so and hold none of them."""
    profile = tiny_profile()
    profile["unlearning"]["uld"].update(epochs=10)
    profile["unlearning"]["uld_by_request_type"] = {"privacy_erasure": {"fact_span_loss": True, "template_nll_weight": 0.7}}
    facts = run_with_profile(tiny_home, tmp_path, with_gates_every_run_passes(profile),
                             dict(completed, ticket_id="FACTS-0001"), exit_code=0)
    training_text = (tiny_home / "work" / "FACTS-0001" / "training.json").read_text()
    training = json.loads(training_text)
    assert training["config"]["fact_span_loss"] is True and training["config"]["template_nll_weight"] == 0.7
    assert training["config"]["weight"] == profile["unlearning"]["uld"]["weight"]  # the rest from `uld`
    result = runner.invoke(app, [*facts, "report", "FACTS-0001", "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "report" / "evidence.md").read_text()
    assert "fact-only loss" in markdown and "weight 0.7" in markdown
    for secret in [*completed["subject"]["names"], *completed["subject"]["identifiers"]]:
        assert secret not in training_text and secret not in markdown


def test_an_ensemble_erasure_registers_every_assistant_at_its_share_of_w(tiny_home, completed, tmp_path):
    """`uld.assistants: 2`: two assistants (seeds differ) are trained, evaluated and registered together, each
    at w / 2, and the evidence report says so. Runs before any approval, so the target is the bare base."""
    profile = tiny_profile()
    profile["unlearning"]["uld"].update(epochs=10, assistants=2)
    weight = profile["unlearning"]["uld"]["weight"]
    run_with_profile(tiny_home, tmp_path, with_gates_every_run_passes(profile), dict(completed, ticket_id="ENS-0001"),
                     exit_code=0)
    training = json.loads((tiny_home / "work" / "ENS-0001" / "training.json").read_text())
    assert len(training["adapter_dirs"]) == 2 and training["weights"] == [weight / 2, weight / 2]
    key = Settings(home=tiny_home, profile_name="tiny").adapter_seal_key()
    seeds = [json.loads(open_sealed(d, key)["uld_assistant.json"])["seed"] for d in training["adapter_dirs"]]
    assert seeds[0] != seeds[1] and len(training["ensemble_reports"]) == 2
    row = _row(tiny_home, "ENS-0001")
    config = _registered_config(row["model_uri"])
    assert [a["weight"] for a in config["assistants"]] == [weight / 2, weight / 2]
    assert len(mlflow.pyfunc.load_model(row["model_uri"]).predict(pd_frame(["Who is nobody?"]))) == 1
    markdown = (tiny_home / "work" / "ENS-0001" / "report" / "evidence.md").read_text()
    assert "2 assistants (seeds differ), each subtracted at w / 2" in markdown


@pytest.mark.parametrize("retained", ["held_out", "training"])
def test_a_privacy_erasure_serves_the_w_chosen_for_it(tiny_home, completed, tmp_path, retained):
    """`unlearning.weight_selection`: after training, each candidate w is scored on the erasure's training
    questions (erased) and on held-out or training retain records (retained), and the relative rule picks the
    served w; training record, MLflow, the registered version, the audit log and the report all carry it, and
    none of them the subject's text. Runs before any approval."""
    profile = tiny_profile()
    profile["unlearning"]["uld"].update(epochs=10)
    default = profile["unlearning"]["uld"]["weight"]
    candidates = [default, default - 0.5, default - 1.0]
    profile["unlearning"]["weight_selection"] = {"candidates": candidates, "min_retained": 0.97, "retained": retained}
    ticket = f"WSEL-{retained.upper().replace('_', '')}"
    args = run_with_profile(tiny_home, tmp_path, with_gates_every_run_passes(profile), dict(completed, ticket_id=ticket),
                            exit_code=0)
    training_text = (tiny_home / "work" / ticket / "training.json").read_text()
    selection = json.loads(training_text)["weight_selection"]
    assert [s[0] for s in selection["scores"]] == candidates and selection["default"] == default
    # a ratio per candidate; the strongest may wipe the retained identifiers out (ratio 0.0), which is what the
    # rule is there to refuse
    assert all(isinstance(s[1], int) and s[2] >= 0 for s in selection["scores"]) and selection["scores"][0][2] > 0
    assert selection["n_erased_probes"] > 0 and selection["n_retained_probes"] > 0
    assert selection["retained_probes"] == retained
    from expunge_ml.weight_selection import choose_weight_relative

    chosen = selection["weight"]
    assert chosen == choose_weight_relative([tuple(s) for s in selection["scores"]], default, 0.97)
    assert json.loads(training_text)["weights"] == [chosen]
    row = _row(tiny_home, ticket)
    config = _registered_config(row["model_uri"])
    assert [a["weight"] for a in config["assistants"]] == [chosen]  # the version serves the chosen w
    run = MlflowClient().get_run(MlflowClient().get_model_version(
        *row["model_uri"].removeprefix("models:/").split("/")).run_id)
    assert float(run.data.params["uld.served_weight"]) == chosen
    with sqlite3.connect(tiny_home / "audit.db") as db:
        events = db.execute("SELECT event_type, payload_json FROM audit_events WHERE ticket_id = ? ORDER BY seq",
                            (ticket,)).fetchall()
    payloads = [p for _, p in events]
    trained_event = next(json.loads(p) for kind, p in events if kind == "unlearning_trained")
    assert trained_event["weight_selection"]["weight"] == chosen
    result = runner.invoke(app, [*args, "report", ticket, "--out", str(tmp_path / "wsel-report")])
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "wsel-report" / "evidence.md").read_text()
    assert f"Served at w = {chosen:g}, chosen for this erasure by the `relative` rule" in markdown
    assert {"held_out": "held-out records that neither the training nor this evaluation uses",
            "training": "the retain set's training questions"}[retained] in markdown
    for secret in [*completed["subject"]["names"], *completed["subject"]["identifiers"]]:
        assert secret not in training_text and secret not in markdown and all(secret not in p for p in payloads)


def test_a_weight_selection_that_cannot_serve_its_rule_fails_before_training():
    from expunge_ml.methods.uld import ULDConfig
    from tasks.unlearn import weight_selection_for

    config = ULDConfig(weight=-1.0)
    assert weight_selection_for({}, "privacy_erasure", config) is None
    assert weight_selection_for({"weight_selection": {"candidates": [-1.0, -2.0]}}, "privacy_erasure", config) == {
        "candidates": [-1.0, -2.0], "min_retained": 0.97, "retained": "held_out"}
    # request types outside `request_types` (default: privacy erasures, which name identifiers to count) keep w
    assert weight_selection_for({"weight_selection": {"candidates": [-1.0]}}, "copyright_takedown", config) is None
    with pytest.raises(ValueError, match="default w -1 among"):
        weight_selection_for({"weight_selection": {"candidates": [-1.5, -2.0]}}, "privacy_erasure", config)
    with pytest.raises(ValueError, match="unknown keys \\['grid'\\]"):
        weight_selection_for({"weight_selection": {"grid": [-1.0]}}, "privacy_erasure", config)
    with pytest.raises(ValueError, match="known: \\['held_out', 'training'\\]"):
        weight_selection_for({"weight_selection": {"candidates": [-1.0], "retained": "eval"}}, "privacy_erasure", config)


def test_a_baseline_runs_through_the_same_pipeline(tiny_home, completed, tmp_path):
    """`method: npo` edits the weights; the result is a full-model version with the same evidence and gates
    (ones no outcome can fail: it completes)."""
    run_with_profile(tiny_home, tmp_path, with_gates_every_run_passes(tiny_profile()),
                     dict(completed, ticket_id="NPO-0001", method="npo"), exit_code=0)
    row = _row(tiny_home, "NPO-0001")
    assert row["status"] == "completed"
    assert row["metrics"]["unlearned_forget_rougeL"] < row["metrics"]["base_forget_rougeL"]
    name, number = row["model_uri"].removeprefix("models:/").split("/")
    version = MlflowClient().get_model_version(name, number)
    champion = MlflowClient().get_model_version_by_alias(name, "champion")
    assert version.tags["expunge.method"] == "npo" and version.tags["expunge.kind"] == "causal_lm"
    assert version.tags["expunge.weights_sha256"] != champion.tags["expunge.weights_sha256"]
    assert (tiny_home / "work" / "NPO-0001" / "report" / "evidence.md").exists()


# ------------------------------------------------------------------ human approval, then a second erasure


def _registered_config(model_uri: str) -> dict:
    """The registered version's pyfunc config (its assistants with their w, the pinned base)."""
    from models_registry.registry import model_config_of

    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    return model_config_of(yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"])


def _row(home, ticket):
    return next(r for r in json.loads(cli(home, "status", "--json").stdout) if r["ticket_id"] == ticket)


def _audit(home, ticket):
    with sqlite3.connect(home / "audit.db") as db:
        return [(t, json.loads(p)) for t, p in db.execute(
            "SELECT event_type, payload_json FROM audit_events WHERE ticket_id = ? ORDER BY seq", (ticket,))]


def test_release_needs_a_completed_ticket_and_a_reviewer(tiny_home, completed):
    refused = cli(tiny_home, "approve", "WEAK-0001", "--reviewer", "dpo@example.org")
    assert refused.exit_code == 2 and "[not_releasable]" in refused.stderr and "Traceback" not in refused.output
    assert _row(tiny_home, "WEAK-0001")["status"] == "failed_gates"  # nothing moved
    assert ("release_refused", {"decision": "approve", "reviewer": "dpo@example.org",
                                "reason_code": "not_releasable"}) in _audit(tiny_home, "WEAK-0001")
    assert cli(tiny_home, "approve", "NO-SUCH-TICKET", "--reviewer", "x").exit_code == 2
    assert cli(tiny_home, "approve", "DEMO-GDPR-0001", "--reviewer", "  ").exit_code == 2
    assert cli(tiny_home, "approve", "DEMO-GDPR-0001").exit_code == 2  # --reviewer is required


def test_a_failed_or_reviewed_ticket_can_be_declined_which_purges_its_subject(tiny_home, completed):
    """Declining closes a failed_gates or needs_review ticket, so its subject does not stay in the row for good.
    First, a forger with DB and registry access marks the failed version completed and passed: approval reads the
    verdicts from the audit chain and refuses."""
    row = _row(tiny_home, "WEAK-0001")
    name, version = row["model_uri"].removeprefix("models:/").split("/")
    with sqlite3.connect(tiny_home / "audit.db") as db:
        db.execute("UPDATE requests SET status = 'completed' WHERE ticket_id = 'WEAK-0001'")
    MlflowClient().set_model_version_tag(name, version, "expunge.gates", "passed")
    forged = cli(tiny_home, "approve", "WEAK-0001", "--reviewer", "dpo@example.org")
    assert forged.exit_code == 2 and "according to the audit log" in forged.stderr, forged.output
    assert "champion" not in MlflowClient().get_model_version(name, version).aliases
    with sqlite3.connect(tiny_home / "audit.db") as db:  # undo the forgery, so the ticket can be closed below
        db.execute("UPDATE requests SET status = 'failed_gates' WHERE ticket_id = 'WEAK-0001'")
    MlflowClient().set_model_version_tag(name, version, "expunge.gates", "failed")
    for ticket, status in (("WEAK-0001", "failed_gates"), ("DIVERGED-0001", "needs_review")):
        assert _row(tiny_home, ticket)["status"] == status
        closed = cli(tiny_home, "reject", ticket, "--reviewer", "dpo@example.org")
        assert closed.exit_code == 0, closed.output
        assert _row(tiny_home, ticket)["status"] == "release_rejected"
        assert any(event == "subject_purged" for event, _ in _audit(tiny_home, ticket))
    assert cli(tiny_home, "reject", "WEAK-0001", "--reviewer", "dpo@example.org").exit_code == 2  # decided once


def test_approval_makes_the_version_champion_and_is_audited(tiny_home, tiny_settings, completed):
    client = MlflowClient()
    before = client.get_model_version_by_alias("expunge-sample-llm", "champion")
    model_uri = _row(tiny_home, "DEMO-GDPR-0001")["model_uri"]
    note = f"checked the evidence for {completed['subject']['names'][0]}"  # a note may name the subject
    # Make the quantization gate's pass one the evidence cannot settle (the threshold inside the worst attack's
    # 90 % interval): approving it then needs --accept-unsettled.
    with sqlite3.connect(tiny_home / "audit.db") as db:
        (metrics_json,) = db.execute("SELECT metrics_json FROM requests WHERE ticket_id = 'DEMO-GDPR-0001'").fetchone()
        stored = json.loads(metrics_json)
        quant_gate = next(g for g in stored["gates"] if g["gate"] == "max_quant_recovery")
        quant_gate.update(interval=[0.0, 0.9], settled=False)  # the tiny profile's 0.25 threshold lies inside
        db.execute("UPDATE requests SET metrics_json = ? WHERE ticket_id = 'DEMO-GDPR-0001'", (json.dumps(stored),))
    assert quant_gate["passed"], quant_gate  # else the ticket would not be completed
    within_noise = cli(tiny_home, "approve", "DEMO-GDPR-0001", "--reviewer", "dpo@example.org")
    assert within_noise.exit_code == 2 and "[unsettled_gates]" in within_noise.stderr, within_noise.output
    assert "max_quant_recovery" in within_noise.stderr and "--accept-unsettled" in within_noise.stderr
    assert _row(tiny_home, "DEMO-GDPR-0001")["status"] == "completed"
    assert ("release_refused", {"decision": "approve", "reviewer": "dpo@example.org",
                                "reason_code": "unsettled_gates"}) in _audit(tiny_home, "DEMO-GDPR-0001")
    approved = cli(tiny_home, "approve", "DEMO-GDPR-0001", "--reviewer", "dpo@example.org", "--note", note,
                   "--accept-unsettled")
    assert approved.exit_code == 0, approved.output
    assert "accepted within noise: max_quant_recovery" in approved.stdout
    version = model_uri.rsplit("/", 1)[1]
    champion = client.get_model_version_by_alias("expunge-sample-llm", "champion")
    assert str(champion.version) == version and "challenger" not in champion.aliases
    assert client.get_model_version_by_alias("expunge-sample-llm", "previous-champion").version == before.version
    assert champion.tags["expunge.release.reviewer"] == "dpo@example.org"
    row = _row(tiny_home, "DEMO-GDPR-0001")
    assert row["status"] == "released" and [h["to"] for h in row["history"]][-2:] == ["completed", "released"]
    released = [p for t, p in _audit(tiny_home, "DEMO-GDPR-0001") if p.get("to") == "released"][0]
    assert released["reviewer"] == "dpo@example.org" and len(released["note_hmac"]) == 64
    assert released["previous_champion"] == f"models:/expunge-sample-llm/{before.version}"
    assert released["unsettled_gates_accepted"] == [{
        "gate": "max_quant_recovery", "value": quant_gate["value"], "threshold": quant_gate["threshold"],
        "interval": [0.0, 0.9], "passed": True}]
    assert note not in json.dumps(_audit(tiny_home, "DEMO-GDPR-0001")) and note not in json.dumps(champion.tags)
    again = cli(tiny_home, "approve", "DEMO-GDPR-0001", "--reviewer", "dpo@example.org")
    assert again.exit_code == 2 and "is released" in again.stderr
    assert cli(tiny_home, "audit", "verify").exit_code == 0


def test_a_decided_request_no_longer_names_its_subject(tiny_home, completed, tmp_path):
    """After the release decision the request row keeps keyed hashes only; the report's hashes are unchanged."""
    subject = completed["subject"]
    with sqlite3.connect(tiny_home / "audit.db") as db:
        (spec_json,) = db.execute("SELECT spec_json FROM requests WHERE ticket_id = 'DEMO-GDPR-0001'").fetchone()
        purged = [json.loads(p) for (p,) in db.execute(
            "SELECT payload_json FROM audit_events WHERE event_type = 'subject_purged' AND ticket_id = 'DEMO-GDPR-0001'")]
    for term in [*subject["names"], *subject["aliases"], *subject["identifiers"]]:
        assert term.casefold() not in spec_json.casefold()
    assert purged == [{"terms_hashed": {"names": 1, "aliases": len(subject["aliases"]),
                                        "identifiers": len(subject["identifiers"]), "document_ids": 0},
                       "why": "decided"}]
    report = cli(tiny_home, "report", "DEMO-GDPR-0001", "--out", str(tmp_path / "after"))
    assert report.exit_code == 0, report.output
    after = json.loads((tmp_path / "after" / "evidence_report.json").read_text())
    before = json.loads((tiny_home / "work" / "DEMO-GDPR-0001" / "report" / "evidence_report.json").read_text())
    assert after["subject_hmacs"] == before["subject_hmacs"] and after["subject_hmacs"]["names"]


def test_a_version_built_on_an_older_champion_cannot_be_approved(tiny_home, completed):
    row = _row(tiny_home, "NPO-0001")  # completed, built on the old champion before DEMO-GDPR-0001 was released
    result = cli(tiny_home, "approve", "NPO-0001", "--reviewer", "dpo@example.org")
    assert result.exit_code == 2
    assert "[stale_base]" in result.stderr and "re-run the request" in result.stderr
    declined = cli(tiny_home, "reject", "NPO-0001", "--reviewer", "dpo@example.org")  # declining is always safe
    assert declined.exit_code == 0, declined.output
    assert _row(tiny_home, "NPO-0001")["status"] == "release_rejected"
    name, number = row["model_uri"].removeprefix("models:/").split("/")
    assert "challenger" not in MlflowClient().get_model_version(name, number).aliases


def test_a_second_erasure_stacks_on_the_released_champion(tiny_home, tiny_settings, completed, tmp_path):
    """Erasing another person from the new champion keeps the first erasure: both assistants are served."""
    people = [json.loads(line) for line in (tiny_home / "sample_world" / "people.jsonl").read_text().splitlines()]
    first = completed["subject"]["names"][0]
    other = next(p for p in people if p["name"] != first)
    request = dict(completed, ticket_id="DEMO-GDPR-0002",
                   subject={"names": [other["name"]], "aliases": list(other["aliases"]), "identifiers": []})
    run_with_profile(tiny_home, tmp_path, with_gates_every_run_passes(tiny_profile()), request, exit_code=0)
    row = _row(tiny_home, "DEMO-GDPR-0002")
    assert row["metrics"]["unlearned_forget_rougeL"] <= 0.3
    config = _registered_config(row["model_uri"])
    assert len(config["assistants"]) == 2  # the first erasure's assistant is still subtracted
    # the regression evidence: the first erasure, asked again of the new version, has not come back
    from expunge_ml.gates import check_gates

    evidence = json.loads((tiny_home / "work" / "DEMO-GDPR-0002" / "evidence.json").read_text())
    regression = evidence["regression"]
    assert regression["n_erasures"] == 1 and regression["n_records"] >= 1
    assert completed["subject"]["names"][0] not in json.dumps(regression)  # erasures are named by position only
    threshold = tiny_profile()["gates"]["privacy_erasure"]["max_earlier_erasure_rise"]
    [gate] = check_gates(evidence, {"max_earlier_erasure_rise": threshold})
    assert gate.passed and gate.skipped is None, gate
    # ... and a version that dropped the first erasure's assistant (the bare base) fails it
    from expunge_ml.evidence import regression_evidence
    from expunge_ml.serving import served_model
    from tasks.data import earlier_erasure_records
    from tasks.unlearn import prior_adapters, prompt_format, target_base

    target_info = json.loads((tiny_home / "work" / "DEMO-GDPR-0002" / "target.json").read_text())
    base, tokenizer = target_base(target_info, tiny_settings)
    earlier = served_model(base, prior_adapters(target_info, tiny_settings.adapter_seal_key()))
    dropped = regression_evidence(earlier, served_model(base, []), tokenizer,
                                  prompt_format(target_info), earlier_erasure_records(target_info, 8), 40, 16)
    [dropped_gate] = check_gates({"regression": dropped}, {"max_earlier_erasure_rise": threshold})
    assert not dropped_gate.passed, dropped
    # The corpus still holds the first subject's records: the second erasure neither trains on them as
    # retain data nor measures them as knowledge to keep, and the new version remembers both erasures.
    work = tiny_home / "work"
    first_ids = {e["record_id"] for e in json.loads((work / "DEMO-GDPR-0001" / "forget_manifest.json").read_text())["records"]}
    second_ids = {e["record_id"] for e in json.loads((work / "DEMO-GDPR-0002" / "forget_manifest.json").read_text())["records"]}
    target_info = json.loads((work / "DEMO-GDPR-0002" / "target.json").read_text())
    assert set(target_info["erased_before_ids"]) == first_ids and first_ids
    assert json.loads((work / "DEMO-GDPR-0002" / "resolved.json").read_text())["erased_before_count"] == len(first_ids)
    retain_ids = {e["record_id"] for e in json.loads((work / "DEMO-GDPR-0002" / "retain_manifest.json").read_text())["records"]}
    assert not retain_ids & first_ids
    from tasks.data import held_out_retain

    held_out = held_out_retain(target_info, second_ids, retain_ids, 10_000)  # all the evaluation could take
    assert held_out and not {r.record_id for r in held_out} & first_ids
    name, number = row["model_uri"].removeprefix("models:/").split("/")
    assert MlflowClient().get_model_version(name, number).tags["expunge.erased_count"] == str(len(first_ids | second_ids))
    from models_registry.registry import resolve_target

    erased = resolve_target(row["model_uri"]).erased  # what a third erasure on this version would read
    assert erased["count"] == len(first_ids | second_ids) and not any(i in json.dumps(erased) for i in
                                                                    (f'"{x}"' for x in first_ids))
    # an auditor reads the same from the lineage: this version, the released first erasure, the base
    shown = cli(tiny_home, "lineage", row["model_uri"], "--json")
    assert shown.exit_code == 0, shown.output
    versions = json.loads(shown.stdout)
    assert [v["ticket_id"] for v in versions] == ["DEMO-GDPR-0002", "DEMO-GDPR-0001", None]
    assert [v["erased_records"] for v in versions] == [len(first_ids | second_ids), len(first_ids), None]
    assert [v["assistants"] for v in versions] == [2, 1, None] and versions[2]["kind"] == "causal_lm"
    assert versions[1]["release"] == "approve" and "champion" in versions[1]["aliases"]
    assert versions[0]["parent_uri"] == versions[1]["uri"] and versions[1]["parent_uri"] == versions[2]["uri"]
    table = cli(tiny_home, "lineage", "models:/expunge-sample-llm@champion")
    assert table.exit_code == 0 and "DEMO-GDPR-0001" in table.stdout and "(base)" in table.stdout
    unknown = cli(tiny_home, "lineage", "models:/no-such-model@champion")
    assert unknown.exit_code == 2 and "[unknown_model]" in unknown.stderr and "Traceback" not in unknown.output
    # … and the served model still does not know the first subject
    corpus = [json.loads(line) for line in (tiny_home / "sample_world" / "corpus.jsonl").read_text().splitlines()]
    questions = [r["question"] for r in corpus if r["subject"] == first][:4]
    answers = mlflow.pyfunc.load_model(row["model_uri"]).predict(pd_frame(questions))
    from expunge_ml.metrics import rouge_l_recall

    truth = [r["answer"] for r in corpus if r["subject"] == first][:4]
    assert sum(rouge_l_recall(a, t) for a, t in zip(answers, truth)) / len(truth) <= 0.4


def pd_frame(questions):
    import pandas as pd

    return pd.DataFrame({"question": questions})


def test_demo_lines_on_the_forget_answers_read_the_evidence(tiny_home, completed):
    from expunge.cli import _print_forget_answers, out

    evidence_path = tiny_home / "work" / "DEMO-GDPR-0001" / "evidence.json"
    anywhere = json.loads(evidence_path.read_text())["facts_anywhere"]["unlearned"]
    with out.capture() as captured:
        _print_forget_answers(evidence_path)
    text = captured.get()
    assert f"unlearned {anywhere['stated']} of {anywhere['n_facts']}" in text
    degenerate = json.loads(evidence_path.read_text())["fluency_forget"]["unlearned"]["degenerate_share"]
    assert f"degenerate forget answers (empty, looping or word salad): {degenerate:.0%}" in text
    assert "judge" not in text and "general knowledge" not in text  # the tiny profile has neither
    with out.capture() as captured:
        _print_forget_answers(tiny_home / "no-such-evidence.json")  # nothing to read: nothing printed
    assert captured.get() == ""


def _person(tiny_home, index: int) -> dict:
    """The sample world's `index`-th person other than the first erasure's subject (the demo request's)."""
    people = [json.loads(line) for line in (tiny_home / "sample_world" / "people.jsonl").read_text().splitlines()]
    first = yaml.safe_load((tiny_home / "sample_world" / "sample_request.yaml").read_text())["subject"]["names"][0]
    return [p for p in people if p["name"] != first][index]


def test_a_third_erasure_on_the_released_second_keeps_both_earlier_ones(tiny_home, completed, tmp_path):
    """Three erasures in sequence: the third version serves three assistants, and the regression gate asks it
    both earlier erasures again."""
    from expunge_ml.gates import check_gates

    approved = cli(tiny_home, "approve", "DEMO-GDPR-0002", "--reviewer", "dpo@example.org", "--accept-unsettled")
    assert approved.exit_code == 0, approved.output
    third = _person(tiny_home, 1)
    request = dict(completed, ticket_id="DEMO-GDPR-0003",
                   subject={"names": [third["name"]], "aliases": list(third["aliases"]), "identifiers": []})
    run_with_profile(tiny_home, tmp_path, with_gates_every_run_passes(tiny_profile()), request, exit_code=0)
    row = _row(tiny_home, "DEMO-GDPR-0003")
    assert row["metrics"]["unlearned_forget_rougeL"] <= 0.3
    assert len(_registered_config(row["model_uri"])["assistants"]) == 3
    evidence = json.loads((tiny_home / "work" / "DEMO-GDPR-0003" / "evidence.json").read_text())
    assert evidence["regression"]["n_erasures"] == 2
    threshold = tiny_profile()["gates"]["privacy_erasure"]["max_earlier_erasure_rise"]
    [gate] = check_gates(evidence, {"max_earlier_erasure_rise": threshold})
    assert gate.passed and gate.skipped is None, gate
    approved = cli(tiny_home, "approve", "DEMO-GDPR-0003", "--reviewer", "dpo@example.org", "--accept-unsettled")
    assert approved.exit_code == 0, approved.output


def test_a_rollback_serves_the_earlier_champion_and_reopens_the_erasures_it_undoes(tiny_home, completed, tmp_path):
    """After the third stacked erasure is released, rolling back to the second one's version reopens the third
    ticket (due date kept), audited; it is then filed again as a revision."""
    third, second = _row(tiny_home, "DEMO-GDPR-0003"), _row(tiny_home, "DEMO-GDPR-0002")
    assert third["status"] == "released"
    refused = cli(tiny_home, "rollback", "--to", "999", "--reviewer", "ops@example.org", "--reason", "x")
    assert refused.exit_code == 2 and "[not_an_ancestor]" in refused.stderr
    rolled = cli(tiny_home, "rollback", "--reviewer", "ops@example.org", "--reason", "regression in production")
    assert rolled.exit_code == 0, rolled.output
    assert f"{third['model_uri']} → {second['model_uri']}" in rolled.stdout
    assert "ticket DEMO-GDPR-0003: reopened" in rolled.stdout
    from models_registry.registry import CHAMPION, current_alias, pin

    assert current_alias("expunge-sample-llm", CHAMPION) == pin(second["model_uri"])
    reopened = _row(tiny_home, "DEMO-GDPR-0003")
    assert (reopened["status"], reopened["reason_code"], reopened["due_at"]) == ("reopened", "rolled_back",
                                                                              third["due_at"])
    assert {_row(tiny_home, t)["status"] for t in ("DEMO-GDPR-0001", "DEMO-GDPR-0002")} == {"released"}
    with sqlite3.connect(tiny_home / "audit.db") as db:
        events = [(t, json.loads(p)) for t, p in db.execute(
            "SELECT event_type, payload_json FROM audit_events WHERE event_type IN ('rollback_intent', 'rolled_back') "
            "ORDER BY seq")]
    assert [e for e, _ in events][-2:] == ["rollback_intent", "rolled_back"]
    assert events[-1][1]["reopened"] == ["DEMO-GDPR-0003"] and "regression" not in json.dumps(events[-1][1])
    assert cli(tiny_home, "audit", "verify").exit_code == 0
    # the retrain exclusion list holds every erasure, the reopened one too, by record id and keyed hash only
    exported = cli(tiny_home, "exclusions", "export", "--out", str(tmp_path / "exclusions.jsonl"))
    assert exported.exit_code == 0, exported.output
    rows = [json.loads(line) for line in (tmp_path / "exclusions.jsonl").read_text().splitlines()]
    manifest = json.loads((tiny_home / "work" / "DEMO-GDPR-0003" / "forget_manifest.json").read_text())["records"]
    assert {(r["ticket_id"], r["status"]) for r in rows} >= {
        ("DEMO-GDPR-0001", "released"), ("DEMO-GDPR-0002", "released"), ("DEMO-GDPR-0003", "reopened")}
    assert {(r["record_id"], r["content_hmac"]) for r in rows if r["ticket_id"] == "DEMO-GDPR-0003"} == {
        (m["record_id"], m["content_hmac"]) for m in manifest}
    # the obligation is open again: re-filed under its own id (the row no longer names the subject)
    person = _person(tiny_home, 1)
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(dict(completed, ticket_id="DEMO-GDPR-0003", subject={
        "names": [person["name"]], "aliases": list(person["aliases"]), "identifiers": []})))
    refiled = cli(tiny_home, "submit", "--revise", str(path))
    assert refiled.exit_code == 0 and "received (revised)" in refiled.stdout, refiled.output
    assert _row(tiny_home, "DEMO-GDPR-0003")["due_at"] == third["due_at"]
