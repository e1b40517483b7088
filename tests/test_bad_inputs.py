"""Bad input gets one clear line, a non-zero exit code, and (where a row exists) a reason in DB + audit log."""
from __future__ import annotations

import json
import sqlite3
import time

import pytest
import yaml
from typer.testing import CliRunner

from expunge.cli import app
from expunge.settings import Settings, load_profile

runner = CliRunner()


def cli(home, *args):
    return runner.invoke(app, ["--home", str(home), "--profile", "tiny", *args])


def request_yaml(ticket: str, **overrides) -> str:
    fields = {
        "ticket_id": ticket,
        "type": "privacy_erasure",
        "regulation": "GDPR",
        "subject": "{names: [Nobody Anywhere]}",
        "target_model": "models:/expunge-sample-llm@champion",
        **overrides,
    }
    return "".join(f"{k}: {v}\n" for k, v in fields.items() if v is not None)


def submit_text(home, tmp_path, text):
    path = tmp_path / "request.yaml"
    path.write_text(text)
    return cli(home, "submit", str(path))


def db_row(home, ticket):
    with sqlite3.connect(home / "audit.db") as db:
        row = db.execute("SELECT status, reason_code FROM requests WHERE ticket_id = ?", (ticket,)).fetchone()
        events = [json.loads(p) for (p,) in db.execute(
            "SELECT payload_json FROM audit_events WHERE ticket_id = ? ORDER BY seq", (ticket,))]
    return row, events


def assert_one_clean_line(result, code: int, fragment: str):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_malformed_yaml(tiny_home, tmp_path):
    result = submit_text(tiny_home, tmp_path, "ticket_id: [oops\n  type: privacy_erasure")
    assert_one_clean_line(result, 2, "malformed YAML")


def test_missing_file(tiny_home, tmp_path):
    assert_one_clean_line(cli(tiny_home, "submit", str(tmp_path / "nope.yaml")), 2, "cannot read")


def test_missing_field_is_rejected_with_reason(tiny_home, tmp_path):
    result = submit_text(tiny_home, tmp_path, request_yaml("BAD-MISSING", regulation=None))
    assert_one_clean_line(result, 2, "missing required field 'regulation'")
    row, events = db_row(tiny_home, "BAD-MISSING")
    assert row == ("rejected", "missing_field")
    assert events[-1]["reason_code"] == "missing_field"


def test_unknown_request_type(tiny_home, tmp_path):
    result = submit_text(tiny_home, tmp_path, request_yaml("BAD-TYPE", type="forget_it_all"))
    assert_one_clean_line(result, 2, "unknown request type 'forget_it_all'")
    assert db_row(tiny_home, "BAD-TYPE")[0] == ("rejected", "unknown_request_type")


def test_subject_matching_no_record_needs_review(tiny_home, tmp_path):
    result = submit_text(tiny_home, tmp_path, request_yaml("BAD-NOBODY"))
    assert_one_clean_line(result, 4, "matches no training record")
    row, events = db_row(tiny_home, "BAD-NOBODY")
    assert row == ("needs_review", "subject_not_found")
    assert events[-1]["forget_count"] == 0
    assert "Nobody Anywhere" not in json.dumps(events)  # only keyed hashes of the subject


@pytest.mark.parametrize("uri", ["models:/no-such-model@champion", "models:/expunge-sample-llm/999", "/no/such/dir"])
def test_unknown_model_uri(tiny_home, tmp_path, uri):
    ticket = f"BAD-MODEL-{abs(hash(uri)) % 10_000}"
    result = submit_text(tiny_home, tmp_path, request_yaml(ticket, target_model=uri))
    assert_one_clean_line(result, 2, "rejected")
    assert db_row(tiny_home, ticket)[0] == ("rejected", "unknown_model")


def test_duplicate_ticket_with_different_content(tiny_home, tmp_path):
    first = submit_text(tiny_home, tmp_path, request_yaml("DUP-1", type="forget_it_all"))
    assert first.exit_code == 2
    second = submit_text(tiny_home, tmp_path, request_yaml("DUP-1"))
    assert_one_clean_line(second, 3, "already")
    with sqlite3.connect(tiny_home / "audit.db") as db:
        assert db.execute("SELECT count(*) FROM requests WHERE ticket_id = 'DUP-1'").fetchone() == (1,)


def test_unknown_ticket_and_profile(tiny_home):
    assert_one_clean_line(cli(tiny_home, "status", "NO-SUCH"), 2, "no request with ticket id")
    assert_one_clean_line(cli(tiny_home, "run", "NO-SUCH"), 2, "no request with ticket id")
    result = runner.invoke(app, ["--home", str(tiny_home), "--profile", "huge", "status"])
    assert_one_clean_line(result, 2, "unknown profile 'huge'")


def test_unknown_method_is_rejected(tiny_home, tmp_path):
    result = submit_text(tiny_home, tmp_path, request_yaml("BAD-METHOD", method="magic"))
    assert_one_clean_line(result, 2, "unknown method 'magic'")
    assert db_row(tiny_home, "BAD-METHOD")[0] == ("rejected", "unknown_method")


def test_a_local_model_directory_is_a_target_when_the_request_names_its_corpus(tiny_home, tmp_path):
    """Users bring their own HF model dir; with no registry tags, the corpus must come with the request."""
    model_dir = tiny_home / "models" / "sample-base"
    corpus = tiny_home / "sample_world" / "corpus.jsonl"
    name = json.loads(corpus.read_text().splitlines()[0])["subject"]
    base = request_yaml("LOCAL-NO-CORPUS", target_model=str(model_dir), subject=f"{{names: [{name}]}}")
    assert_one_clean_line(submit_text(tiny_home, tmp_path, base), 2, "add a 'corpus:' section")
    assert db_row(tiny_home, "LOCAL-NO-CORPUS")[0] == ("rejected", "no_corpus")
    with_corpus = request_yaml("LOCAL-OK", target_model=str(model_dir), subject=f"{{names: [{name}]}}",
                               corpus=f"{{source: {corpus}}}")
    result = submit_text(tiny_home, tmp_path, with_corpus)
    assert result.exit_code == 0, result.output
    assert "received: 10 matching records" in result.stdout
    # and it runs end to end: no registry tags, default prompt format, versions under the directory's name; under
    # gates no outcome can fail, so it completes and the version becomes the challenger
    profile = tmp_path / "passing.yaml"
    profile.write_text(yaml.safe_dump(with_gates_every_run_passes(load_profile("tiny"))))
    ran = runner.invoke(app, ["--home", str(tiny_home), "--profile", str(profile), "run", "LOCAL-OK"])
    assert ran.exit_code == 0, ran.output
    rows = json.loads(cli(tiny_home, "status", "--json").stdout)
    row = next(r for r in rows if r["ticket_id"] == "LOCAL-OK")
    assert row["status"] == "completed"
    assert row["model_uri"].startswith("models:/sample-base-unlearned/")


def with_gates_every_run_passes(profile: dict) -> dict:
    """`profile` with gates no outcome can fail (forget ROUGE-L recall <= 1, retain ratio >= 0)."""
    return {**profile, "gates": {kind: {"max_forget_rougeL": 1.0, "min_retain_rougeL_ratio": 0.0}
                                 for kind in profile["gates"]}}


def test_a_configured_fluency_judge_must_exist(tiny_home, tmp_path):
    """`evaluation.fluency_judge` is resolved against the home; a missing one is an error, not a silent skip."""
    from expunge_ml.fluency import FluencyJudge
    from tasks.evaluate import fluency_judge

    assert fluency_judge(tiny_home, None, "cpu") is None
    with pytest.raises(FileNotFoundError, match="make smollm2"):
        fluency_judge(tiny_home, "models/no-such-judge", "cpu")
    judge = fluency_judge(tiny_home, "models/sample-base", "cpu")  # any local causal LM directory loads
    assert isinstance(judge, FluencyJudge) and judge.tokenizer.eos_token_id is not None
    assert isinstance(fluency_judge(tmp_path, str(tiny_home / "models" / "sample-base"), "cpu"), FluencyJudge)


def test_a_profile_number_written_with_an_exponent_is_a_number(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-6` as a string; profiles read it as the number it is; quoted text stays text."""
    path = tmp_path / "p.yaml"
    path.write_text('unlearning: {uld: {relative_top: 1e-6, lr: 3.0e-3, weight: -1.5, epochs: 60}}\nname: "1e-6"\n')
    loaded = load_profile(str(path))
    assert loaded["unlearning"]["uld"] == {"relative_top": 1e-6, "lr": 0.003, "weight": -1.5, "epochs": 60}
    assert isinstance(loaded["unlearning"]["uld"]["epochs"], int) and loaded["name"] == "1e-6"


def test_a_binary_a_huge_and_a_deeply_nested_file_each_get_one_line(tiny_home, tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    assert_one_clean_line(cli(tiny_home, "submit", str(binary)), 2, "not UTF-8 text")
    assert_one_clean_line(submit_text(tiny_home, tmp_path, request_yaml("BIG-1", notes="x" * 70_000)), 2,
                          "at most 65536")
    nested = "ticket_id: DEEP-1\nsubject: " + "[" * 10_000 + "]" * 10_000 + "\n"
    assert_one_clean_line(submit_text(tiny_home, tmp_path, nested), 2, "nests deeper than 20 levels")
    control = request_yaml("CTRL-1", notes='"a\x1b[31mred"')
    assert_one_clean_line(submit_text(tiny_home, tmp_path, control), 2, "control characters")


def test_an_invalid_ticket_id_is_never_stored_and_case_does_not_make_a_new_ticket(tiny_home, tmp_path):
    long_id = "A" * 1_000_000
    result = submit_text(tiny_home, tmp_path, request_yaml(long_id, subject="{}"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    with sqlite3.connect(tiny_home / "audit.db") as db:
        assert db.execute("SELECT max(length(ticket_id)) FROM requests").fetchone()[0] <= 64
    newline = submit_text(tiny_home, tmp_path, request_yaml('"FAKE-1\\nFAKE-2"'))
    assert_one_clean_line(newline, 2, "invalid 'ticket_id'")
    assert db_row(tiny_home, "FAKE-1\nFAKE-2")[0] is None
    first = submit_text(tiny_home, tmp_path, request_yaml("case-1", notes="first"))
    assert first.exit_code in (0, 4), first.output  # stored (received or needs_review)
    other_case = submit_text(tiny_home, tmp_path, request_yaml("CASE-1", notes="second"))
    assert_one_clean_line(other_case, 3, "ticket case-1 already exists")
    assert db_row(tiny_home, "CASE-1")[0] is None


def test_concurrent_submits_of_one_ticket_store_it_once_without_a_traceback(tiny_home, tmp_path):
    import threading

    from expunge.service import submit

    path = tmp_path / "same.yaml"
    path.write_text(request_yaml("SAME-1"))
    settings = Settings(home=tiny_home, profile_name="tiny")
    results, barrier = [], threading.Barrier(3)

    def go() -> None:
        barrier.wait()
        results.append(submit(settings, path))

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.reason_code or "stored" for r in results).count("duplicate_ticket") == 2
    with sqlite3.connect(tiny_home / "audit.db") as db:
        assert db.execute("SELECT count(*) FROM requests WHERE ticket_id = 'SAME-1'").fetchone() == (1,)


def test_a_resting_ticket_stops_naming_its_subject_after_the_retention_period(tiny_home, tmp_path):
    """A needs_review ticket nobody acts on: `expunge run` hashes its subject terms once it has rested longer than
    `privacy.retention_days` (default 30), and audits that."""
    from datetime import datetime, timedelta, timezone

    from expunge.service import purge_resting_subjects

    home = tmp_path / "home"
    text = request_yaml("REST-1", subject="{names: [Nobody Anywhere], identifiers: [nobody@nowhere.example]}",
                        target_model=str(tiny_home / "models" / "sample-base"),
                        corpus=f"{{source: {tiny_home / 'sample_world' / 'corpus.jsonl'}}}")
    assert submit_text(home, tmp_path, text).exit_code == 4  # needs_review: the subject matches no record
    settings = Settings(home=home, profile_name="tiny")
    assert purge_resting_subjects(settings) == []  # not yet
    later = datetime.now(timezone.utc) + timedelta(days=31)
    assert purge_resting_subjects(settings, now=later) == ["REST-1"]
    assert purge_resting_subjects(settings, now=later) == []  # once
    with sqlite3.connect(home / "audit.db") as db:
        (spec_json,) = db.execute("SELECT spec_json FROM requests WHERE ticket_id = 'REST-1'").fetchone()
        (why,) = db.execute("SELECT payload_json FROM audit_events WHERE event_type = 'subject_purged'").fetchone()
    assert "nobody" not in spec_json.casefold() and json.loads(why)["why"] == "retention_30_days"
    Settings(home=tiny_home, profile_name="tiny").apply_environment()  # later tests expect the shared home


def test_request_files_dropped_in_the_inbox_are_submitted_and_filed_by_outcome(tiny_home, tmp_path):
    home = tmp_path / "home"
    inbox = home / "inbox"
    inbox.mkdir(parents=True)
    target = str(tiny_home / "models" / "sample-base")
    corpus = f"{{source: {tiny_home / 'sample_world' / 'corpus.jsonl'}}}"
    name = json.loads((tiny_home / "sample_world" / "corpus.jsonl").read_text().splitlines()[0])["subject"]
    (inbox / "good.yaml").write_text(request_yaml("INBOX-1", subject=f"{{names: [{name}]}}", target_model=target,
                                                  corpus=corpus))
    (inbox / "bad.yaml").write_text(request_yaml("INBOX-2", type="forget_everything"))
    (inbox / "binary.yml").write_bytes(bytes(range(256)))
    (inbox / "notes.txt").write_text("not a request")  # left alone
    result = runner.invoke(app, ["--home", str(home), "--profile", "tiny", "inbox"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (inbox / "accepted").iterdir()) == ["good.yaml"]
    rejected = sorted(p.name for p in (inbox / "rejected").iterdir())
    assert rejected == ["bad.yaml", "bad.yaml.reason.txt", "binary.yml", "binary.yml.reason.txt"]
    assert (inbox / "rejected" / "bad.yaml.reason.txt").read_text().startswith("unknown_request_type:")
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == ["notes.txt"]
    assert db_row(home, "INBOX-1")[0] == ("received", None)
    (inbox / "good.yaml").write_text((inbox / "accepted" / "good.yaml").read_text())  # dropped twice
    runner.invoke(app, ["--home", str(home), "--profile", "tiny", "inbox"])
    assert len(list((inbox / "rejected").glob("good*.yaml"))) == 1  # a duplicate, filed with its reason
    from expunge.inbox import expire_filed_requests

    settings = Settings(home=home, profile_name="tiny")
    assert expire_filed_requests(settings) == []  # within the retention period
    later = time.time() + 31 * 86400
    assert "accepted/good.yaml" in expire_filed_requests(settings, now=later)  # they name the subject in clear
    assert not any(p.is_file() for p in (inbox / "accepted").iterdir())
    Settings(home=tiny_home, profile_name="tiny").apply_environment()  # later tests expect the shared home


def test_a_database_migrated_by_a_newer_expunge_is_refused_in_one_line(tmp_path):
    from db.session import dispose_engines

    home = tmp_path / "home"
    assert cli(home, "status").exit_code == 0  # creates the database at this expunge's revision
    with sqlite3.connect(home / "audit.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '0099'")
    dispose_engines()  # a new process: nothing remembers the database as upgraded
    refused = cli(home, "status")
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "schema revision 0099, newer than this expunge knows" in refused.stderr
