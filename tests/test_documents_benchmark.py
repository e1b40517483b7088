"""`expunge benchmark documents`: which documents play which part, the row summary on hand-made evidence,
and a smoke run on the real TOFU files with a tiny model and the tiny profile."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_tofu_benchmark import NEEDED, TOFU

needs_tofu = pytest.mark.skipif(not all((TOFU / name).exists() for name in NEEDED),
                                reason=f"TOFU files not found under {TOFU} (see ../shared/datasets/README.md)")


def test_takedowns_held_out_and_dev_documents_never_overlap():
    from benchmarks.documents import DocumentBenchOptions, make_plan
    from expunge_ml.tofu import forget_authors

    plan = make_plan(DocumentBenchOptions(n_retain_authors=4, holdout_authors=2))
    forget05 = forget_authors("forget05")
    assert plan.takedowns == {"forget01": forget_authors("forget01"), "forget05": forget05}
    assert set(plan.trained_authors) == set(forget05) | set(plan.retain_authors) and len(plan.retain_authors) == 4
    # held-out authors are neither trained nor any TOFU split's (forget10 included): true non-members
    assert not set(plan.holdout_authors) & (set(plan.trained_authors) | set(forget_authors("forget10")))
    assert len(plan.holdout_authors) == 2
    dev = make_plan(DocumentBenchOptions(n_retain_authors=4, holdout_authors=2, dev_authors=2))
    # the dev takedown is two trained retain authors, never a reported one; the reported ones stay trained
    assert dev.takedowns == {"dev": plan.retain_authors[:2]} and dev.trained_authors == plan.trained_authors
    with pytest.raises(ValueError, match="dev_authors must be in"):
        DocumentBenchOptions(n_retain_authors=4, dev_authors=4).validate()
    with pytest.raises(ValueError, match="unknown or no methods"):
        DocumentBenchOptions(methods=("whp",)).validate()


def _evidence(auc: float, recoveries: dict) -> dict:
    split = lambda rouge: {"rougeL_recall": rouge, "fact_recall": 0.25, "answer_prob": 0.1, "rougeL_f1": rouge}
    return {
        "metrics": {"base": {"forget": split(0.9), "retain": split(0.8)},
                    "unlearned": {"forget": split(0.2), "retain": split(0.6)}},
        "muse": {"unlearned": {"verbmem_forget": 0.3, "mia": {"auc_min_k_pp": auc}}},
        "quantization": {name: {"forget": {"rougeL_recall": 0.5}, "recovery": r} for name, r in recoveries.items()},
        "fluency": {"base": {"distinct_2": 0.8}, "unlearned": {"distinct_2": 0.6}},
    }


def test_a_row_reads_privleak_against_the_oracle_and_the_worst_attack():
    from benchmarks.documents import summarise

    gates = [{"gate": "max_forget_rougeL", "passed": True}, {"gate": "max_quant_recovery", "passed": False}]
    row = summarise(_evidence(0.75, {"int8": 0.1, "int4": 0.4, "nf4": None}), gates, oracle_auc=0.6)
    assert row["retain_rougeL_ratio"] == pytest.approx(0.6 / 0.8)
    assert row["privleak_vs_oracle"] == pytest.approx((0.75 - 0.6) / 0.6)  # MUSE: (AUC − AUC_retrain) / AUC_retrain
    assert row["worst_quant_recovery"] == 0.4  # an attack with nothing to recover (None) is not the worst
    assert row["fluency_ratio"] == pytest.approx(0.75)
    assert (row["gates_passed"], row["failed_gates"]) == (False, ["max_quant_recovery"])
    no_oracle = summarise(_evidence(0.75, {}), [], oracle_auc=None)
    assert no_oracle["privleak_vs_oracle"] is None and no_oracle["worst_quant_recovery"] is None
    assert no_oracle["gates_passed"] is True


@needs_tofu
def test_documents_benchmark_smoke(tmp_path: Path):
    """Tiny model, forget01's two documents taken down under the tiny profile; checks the report's shape, that
    the profile's own gates were applied, and that no document text reaches the results."""
    from benchmarks.documents import DocumentBenchOptions, run_documents_benchmark
    from expunge.settings import load_profile
    from expunge_ml.corpus import CorpusSpec, load_corpus
    from expunge_ml.methods.registry import uld_config_for

    out = tmp_path / "out"
    opts = DocumentBenchOptions(
        data_dir=str(TOFU), cache_dir=str(tmp_path / "cache"), out_dir=str(out), profile="tiny",
        splits=("forget01",), methods=("uld", "ga"), n_retain_authors=4, holdout_authors=1, passage_words=24,
        prefix_words=8, vocab_size=400, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
        max_length=64, base_epochs=100, base_lr=1e-2, base_target_loss=0.05, min_base_rougeL=0.5,
        uld={"epochs": 20}, threads=1, quiet=True,
    )
    report = run_documents_benchmark(opts, command="pytest smoke")
    saved = json.loads((out / "documents.json").read_text())
    assert saved["command"] == "pytest smoke" and saved["complete"] and saved["profile"]["name"] == "tiny"
    assert (out / "documents.md").read_text().startswith("# Document takedowns")
    rows = {r["method"]: r for r in saved["rows"]}
    assert list(rows) == ["base", "retain_oracle", "uld", "ga"]
    assert {r["split"] for r in saved["rows"]} == {"forget01"}
    tiny = load_profile("tiny")
    # the profile's ULD settings for a takedown with the run's partial `uld` on top, served at the profile's w
    profile_uld = uld_config_for(tiny["unlearning"], "copyright_takedown")
    assert saved["profile"]["uld"] == dataclasses.asdict(dataclasses.replace(profile_uld, epochs=20))
    assert rows["uld"]["served_weight"] == profile_uld.weight
    assert [g["gate"] for g in rows["uld"]["gates"]] == list(tiny["gates"]["copyright_takedown"])  # all of them
    assert rows["uld"]["gates_passed"] == all(g["passed"] for g in rows["uld"]["gates"])
    assert set(rows["uld"]["quantized"]) == {"int8", "int4", "nf4"}
    assert rows["uld"]["epochs"] >= 1 and rows["ga"]["epochs"] >= 1
    base, oracle, uld = rows["base"], rows["retain_oracle"], rows["uld"]
    assert base["forget_rougeL"] >= 0.5 > oracle["forget_rougeL"]  # the base memorised them; the oracle never saw them
    assert uld["forget_rougeL"] < base["forget_rougeL"]  # and the takedown moved it
    assert 0.0 <= uld["mia_auc"] <= 1.0 and uld["privleak_vs_oracle"] is not None
    assert report["rows"] == saved["rows"]

    # the documents' text stays in the cache: not one passage is in the report
    cache_docs = next((tmp_path / "cache" / "documents").glob("documents-*/trained.jsonl"))
    written = (out / "documents.json").read_text() + (out / "documents.md").read_text()
    for passage in load_corpus(CorpusSpec(str(cache_docs), kind="documents", passage_words=24, prefix_words=8)):
        assert passage.answer not in written and passage.question not in written


def test_the_cli_refuses_an_unknown_method_with_a_one_line_error():
    from expunge.cli import app

    result = CliRunner().invoke(app, ["benchmark", "documents", "--methods", "uld,whp"])
    assert result.exit_code == 2 and "unknown or no methods ['whp']" in result.output


def test_the_cli_refuses_a_misspelt_uld_setting_before_training(tmp_path):
    from expunge.cli import app

    config = tmp_path / "run.yaml"
    config.write_text("uld: {wieght: -1.0}\n")
    result = CliRunner().invoke(app, ["benchmark", "documents", "--config", str(config), "--profile", "tiny",
                                      "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 2 and "uld: unknown setting(s) wieght" in result.output
    assert not (tmp_path / "out").exists()


def test_a_profile_that_selects_w_for_takedowns_is_refused(tmp_path):
    """The weight rule scores identifiers; a document takedown has none, so the benchmark would not measure
    what the profile serves."""
    import yaml

    from benchmarks.documents import DocumentBenchOptions, run_documents_benchmark
    from expunge.settings import load_profile

    profile = load_profile("tiny")
    weight = profile["unlearning"]["uld"]["weight"]
    profile["unlearning"]["weight_selection"] = {"request_types": ["copyright_takedown"], "candidates": [weight]}
    path = tmp_path / "selects.yaml"
    path.write_text(yaml.safe_dump(profile))
    with pytest.raises(ValueError, match="weight_selection scores identifiers"):
        run_documents_benchmark(DocumentBenchOptions(profile=str(path), out_dir=str(tmp_path / "out"), quiet=True))
