"""Document corpora: a `text` column cut into passages (opening words → the rest), and a takedown of one
document end to end on a model trained on raw passages."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from expunge.cli import app
from expunge_ml.corpus import (DOCUMENT_PROMPT_TEMPLATE, CorpusError, CorpusSpec, load_corpus, load_holdout, open_corpus,
                               resolve_subject)

runner = CliRunner()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_document_is_cut_into_passages_that_cover_every_word(tmp_path):
    text = "w1 w2\nw3 w4 w5  w6 w7 w8 w9 w10"
    path = write_jsonl(tmp_path / "docs.jsonl", [
        {"document_id": "book-1", "text": text, "pii": ["w7 w8", "absent"]},
        {"document_id": "book-2", "text": "alone"},  # one word: nothing to continue, skipped
    ])
    records, spec = open_corpus(CorpusSpec(str(path), passage_words=4, prefix_words=2))
    assert spec.kind == "documents" and spec.prompt_template == DOCUMENT_PROMPT_TEMPLATE
    # 10 words in windows of 4: [1-4] [5-8] [9-10]; the 2-word tail is shorter than prefix + 2, so it joins
    # the window before it; each window's first 2 words prompt the rest, whitespace kept as written
    assert [(r.record_id, r.question, r.answer) for r in records] == [
        ("book-1#0", "w1 w2", "w3 w4"),
        ("book-1#1", "w5  w6", "w7 w8 w9 w10"),
    ]
    assert [r.document_id for r in records] == ["book-1", "book-1"]
    assert [r.pii for r in records] == [(), ("w7 w8",)]  # a document's identifiers, where the passage has them
    assert spec.as_dict() == {"source": str(path), "split": "train", "columns": {}, "kind": "documents",
                              "passage_words": 4, "prefix_words": 2}


def test_a_name_cut_by_a_passage_boundary_matches_both_passages(tmp_path):
    # passages of 6 words: "Ada" ends passage 0 and "Lind" starts passage 1; passage 2 never names her
    text = "w1 w2 w3 w4 w5 Ada\nLind w8 w9 w10 w11 w12 w13 w14 w15 Adalind w17 w18"
    path = write_jsonl(tmp_path / "docs.jsonl", [{"document_id": "d", "text": text},
                                                 {"document_id": "e", "text": "w1 w2 w3 w4 w5 Ada"}])
    records, _ = open_corpus(CorpusSpec(str(path), passage_words=6, prefix_words=2))
    assert [(r.record_id, r.passage_index) for r in records] == [("d#0", 0), ("d#1", 1), ("d#2", 2), ("e#0", 0)]
    match = resolve_subject(records, names=["ada lind"])
    assert match.forget_ids == ["d#0", "d#1"] and match.matched_by == {"name": 2}
    # another document's passage does not continue this one, nor does a passage whose neighbour is absent
    assert resolve_subject([records[0], records[2], records[3]], names=["ada lind"]).forget_ids == []
    # a term inside one passage still matches that passage alone; part of a word is no match
    assert resolve_subject(records, names=["w8 w9"]).forget_ids == ["d#1"]
    assert resolve_subject(records, names=["ada l"]).forget_ids == []  # across the boundary too


def test_a_short_passage_keeps_a_continuation_and_columns_are_mapped(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"id": "d", "body": "a b c", "who": "Ann"}])
    spec = CorpusSpec(str(path), columns={"text": "body", "record_id": "id", "subject": "who"}, prefix_words=16)
    [record] = load_corpus(spec)
    # at most half of a passage prompts it: 3 words → 1 + 2
    assert (record.record_id, record.question, record.answer, record.subject) == ("d#0", "a", "b c", "Ann")
    assert record.document_id == "d"  # the document's own id when there is no document_id column


def test_qa_corpora_stay_qa_and_bad_document_settings_are_clear_errors(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q?", "answer": "a", "text": "ignored"}])
    records, spec = open_corpus(CorpusSpec(str(qa)))
    assert spec.kind == "qa" and spec.prompt_template is None and records[0].answer == "a"
    assert "kind" not in CorpusSpec(str(qa)).as_dict()  # an unresolved spec writes what it was given
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": "one two three"}])
    with pytest.raises(CorpusError, match="needs question and answer columns; a document corpus a text column"):
        load_corpus(CorpusSpec(str(docs), kind="qa"))
    with pytest.raises(CorpusError, match="1 <= prefix_words < passage_words"):
        load_corpus(CorpusSpec(str(docs), passage_words=8, prefix_words=8))
    with pytest.raises(CorpusError, match="corpus kind must be one of"):
        load_corpus(CorpusSpec(str(docs), kind="books"))
    nothing = write_jsonl(tmp_path / "empty.jsonl", [{"text": "x"}])
    with pytest.raises(CorpusError, match="no document of two words or more"):
        load_corpus(CorpusSpec(str(nothing)))


def test_a_document_corpus_holdout_is_cut_the_same_way(tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": "a b c d e f"}])
    held = write_jsonl(tmp_path / "held.jsonl", [{"text": "g h i j k l"}])
    _, spec = open_corpus(CorpusSpec(str(docs), holdout=str(held), passage_words=6, prefix_words=2))
    [record] = load_holdout(spec)
    assert (record.question, record.answer) == ("g h", "i j k l")


# ------------------------------------------------------------------ end to end: "forget this document"


@pytest.fixture(scope="module")
def document_model(tiny_home, tmp_path_factory) -> tuple[Path, Path]:
    """A user's own model trained on raw document passages (the tiny world's bios but the last, which
    `holdout.jsonl` beside the documents holds), saved as an HF dir."""
    import torch

    from expunge_ml.modeling import SmallLlamaShape, build_small_llama, train_bpe_tokenizer, train_on_qa
    from expunge_ml.prompting import PromptFormat

    # the last document is never trained on: the corpus's holdout (membership-inference non-members)
    lines = (tiny_home / "sample_world" / "documents.jsonl").read_text().splitlines(keepends=True)
    out = tmp_path_factory.mktemp("document-model")
    documents, holdout = out / "documents.jsonl", out / "holdout.jsonl"
    documents.write_text("".join(lines[:-1]))
    holdout.write_text(lines[-1])
    records = load_corpus(CorpusSpec(str(documents), passage_words=24, prefix_words=8))
    tokenizer = train_bpe_tokenizer([r.question + " " + r.answer for r in records], vocab_size=700)
    # 4 layers, so the tiny profile's assistant (its first 2 + LoRA) starts unlike the model, as ULD's does
    model = build_small_llama(tokenizer, SmallLlamaShape(96, 192, 4, 4, 128), seed=0)
    torch.manual_seed(0)
    train_on_qa(model, tokenizer, PromptFormat(template=DOCUMENT_PROMPT_TEMPLATE), [r.pair for r in records],
                epochs=200, lr=0.004, batch_size=16, target_loss=0.03)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out / "model", documents


def write_takedown(tmp_path: Path, ticket: str, document_id: str, model_dir: Path, documents: Path,
                   holdout: Path | None = None) -> Path:
    """A DMCA takedown of one document of `documents` (cut as `document_model` trained on it), as request YAML."""
    corpus = {"source": str(documents), "passage_words": 24, "prefix_words": 8,
              **({"holdout": str(holdout)} if holdout else {})}
    request = {"ticket_id": ticket, "type": "copyright_takedown", "regulation": "DMCA",
               "requested_by": "legal@example.org", "subject": {"document_ids": [document_id]},
               "target_model": str(model_dir), "corpus": corpus, "registered_name": "books-model-unlearned"}
    path = tmp_path / f"{ticket}.yaml"
    path.write_text(yaml.safe_dump(request))
    return path


def test_a_takedown_of_one_document_on_a_document_corpus(tiny_home, tiny_settings, document_model, tmp_path):
    model_dir, documents = document_model
    book = json.loads(documents.read_text().splitlines()[0])
    request_path = write_takedown(tmp_path, "DOCS-0001", book["document_id"], model_dir, documents,
                                  holdout=documents.parent / "holdout.jsonl")
    # A passage is memorised verbatim, token by token as sure as the model can be: the assistant must end nearly as
    # sure of it (a forget NLL near 0.01, 200 epochs on two passages) and outweigh it (w -2). The gates are ones no
    # outcome can fail, so the run completes: this test is about the document path; the thresholds below are its own.
    profile = yaml.safe_load((Path(__file__).resolve().parents[1] / "expunge/profiles/tiny.yaml").read_text())
    profile["unlearning"]["uld"].update(target_forget_loss=0.01, weight=-2.0, epochs=200)
    profile["gates"] = {kind: {"max_forget_rougeL": 1.0, "min_retain_rougeL_ratio": 0.0} for kind in profile["gates"]}
    profile_path = tmp_path / "documents-profile.yaml"
    profile_path.write_text(yaml.safe_dump(profile))
    args = ["--home", str(tiny_home), "--profile", str(profile_path)]
    submitted = runner.invoke(app, [*args, "submit", str(request_path)])
    assert submitted.exit_code == 0 and "received: 2 matching records" in submitted.stdout, submitted.output
    ran = runner.invoke(app, [*args, "run", "DOCS-0001"])
    assert ran.exit_code == 0, ran.output

    work = tiny_home / "work" / "DOCS-0001"
    target = json.loads((work / "target.json").read_text())
    assert target["prompt_template"] == DOCUMENT_PROMPT_TEMPLATE and target["corpus"]["kind"] == "documents"
    assert json.loads((work / "resolved.json").read_text())["matched_by"] == {"document_id": 2}
    metrics = json.loads((work / "metrics.json").read_text())["metrics"]
    base, unlearned = metrics["base"], metrics["unlearned"]
    assert base["forget"]["rougeL_recall"] >= 0.9  # the model continued the document verbatim …
    assert unlearned["forget"]["rougeL_recall"] <= 0.5  # … and no longer does
    assert unlearned["retain"]["rougeL_recall"] >= 0.9 * base["retain"]["rougeL_recall"]  # the others it still does

    row = next(r for r in json.loads(runner.invoke(app, [*args, "status", "--json"]).stdout)
               if r["ticket_id"] == "DOCS-0001")
    # the request named the registry name its versions go under
    assert row["status"] == "completed" and row["model_uri"].startswith("models:/books-model-unlearned/")
    version = MlflowClient().get_model_version(*row["model_uri"].removeprefix("models:/").split("/"))
    assert "challenger" in version.aliases
    local = Path(mlflow.artifacts.download_artifacts(row["model_uri"]))
    from models_registry.registry import model_config_of

    config = model_config_of(yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"])
    assert config["prompt_template"] == DOCUMENT_PROMPT_TEMPLATE  # served raw, as the model was trained
    other = json.loads(documents.read_text().splitlines()[1])["text"]
    import pandas as pd

    [continuation] = mlflow.pyfunc.load_model(row["model_uri"]).predict(
        pd.DataFrame({"question": [" ".join(other.split()[:8])]}))
    assert continuation.split()[:3] == other.split()[8:11]  # another document still continues as written

    markdown = (work / "report" / "evidence.md").read_text()
    assert "Corpus: documents, cut into passages of 24 words, each prompted with its first 8 as written" in markdown
    assert "truth ratios below" not in markdown  # documents have no paraphrased / perturbed answers to ratio
    report_json = json.loads((work / "report" / "evidence_report.json").read_text())
    assert report_json["training"]["truth_ratio_texts_trained_on"] is False  # the JSON says the same

    # the taken-down text is in no log, tag, artifact or report: ids and keyed hashes only
    with sqlite3.connect(tiny_home / "audit.db") as db:
        audit = "\n".join(p for (p,) in db.execute(
            "SELECT payload_json FROM audit_events WHERE ticket_id = 'DOCS-0001'"))
    stored = audit + json.dumps(version.tags) + "".join(
        p.read_text() for p in work.glob("*.json")) + ran.output + markdown
    for passage in load_corpus(CorpusSpec(str(documents), passage_words=24, prefix_words=8))[:2]:
        assert passage.question not in stored and passage.answer not in stored


def test_a_takedowns_retain_set_grows_with_retain_per_forget_but_leaves_the_evaluation_its_records(
        tiny_home, tiny_settings, document_model, tmp_path):
    """The resolving step sizes the retain set by `retain_size`: retain_per_forget × the forget passages when
    that is more than retain_max, capped so that evaluation.retain_eval_max passages stay unseen."""
    from prefect.logging import disable_run_logger

    from tasks.data import resolve_forget_set

    model_dir, documents = document_model
    book = json.loads(documents.read_text().splitlines()[0])
    passages = load_corpus(CorpusSpec(str(documents), passage_words=24, prefix_words=8))
    n_forget = sum(p.document_id == book["document_id"] for p in passages)
    base_profile = yaml.safe_load((Path(__file__).resolve().parents[1] / "expunge/profiles/tiny.yaml").read_text())
    reserve = 4  # the tiny corpus has 14 passages: keep 4 unseen for the evaluation
    base_profile["evaluation"]["retain_eval_max"] = reserve
    assert len(passages) - n_forget > reserve + 3 * n_forget  # room for the uncapped case below
    for ticket, per_forget, expected in [("DOCS-RPF-1", 3, 3 * n_forget),
                                         ("DOCS-RPF-2", 1000, len(passages) - n_forget - reserve)]:
        profile = {**base_profile, "unlearning": {**base_profile["unlearning"], "retain_max": 1,
                                                  "retain_per_forget": per_forget}}
        profile_path = tmp_path / f"{ticket}-profile.yaml"
        profile_path.write_text(yaml.safe_dump(profile))
        args = ["--home", str(tiny_home), "--profile", str(profile_path)]
        submitted = runner.invoke(app, [*args, "submit", str(write_takedown(tmp_path, ticket, book["document_id"],
                                                                            model_dir, documents))])
        assert submitted.exit_code == 0, submitted.output
        with disable_run_logger():
            resolved = resolve_forget_set.fn(str(tiny_home), str(profile_path), ticket)
        assert (resolved.forget_count, resolved.retain_count) == (n_forget, expected)
        retain_ids = {e["record_id"] for e in json.loads(Path(resolved.retain_manifest).read_text())["records"]}
        assert len(retain_ids) == expected and not retain_ids & {p.record_id for p in passages
                                                                 if p.document_id == book["document_id"]}
