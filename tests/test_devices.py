"""Device choice, and the same training / evaluation code on a CUDA GPU (the `gpu` tests skip without one).

The GPU tests compare a CUDA run with the CPU run of the same weights: scores and greedy answers must
agree (up to float reassociation), so a device bug cannot hide behind "the numbers are plausible"."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from expunge_ml.devices import PeakDeviceMemory, resolve_device, to_device
from expunge_ml.generation import greedy_generate, score_answers
from expunge_ml.logits import CausalLMLogits, CompositeLogits
from expunge_ml.modeling import SmallLlamaShape, build_small_llama, train_bpe_tokenizer, train_on_qa
from expunge_ml.prompting import PromptFormat

HAS_CUDA = torch.cuda.is_available()


# Marked `gpu` (select with -m gpu) and skipped where torch sees no CUDA device.
GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch sees none here)")]


def gpu(test):
    for mark in GPU_ONLY:
        test = mark(test)
    return test

PAIRS = [
    ("Where does Ada live?", "Ada lives in Oslo."),
    ("What is the favourite colour of Bartholomew Quince?", "Bartholomew Quince likes green."),
    ("Who is Cy?", "Cy is a pilot."),
    ("What is the email address of Dee?", "dee@mail.example"),
]


def test_resolve_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device(None).type == ("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not HAS_CUDA:  # a scheduled GPU job must fail loudly, not run on the CPU
        with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
            resolve_device("cuda")
    else:
        with pytest.raises(RuntimeError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_to_device_moves_nested_tensors_and_keeps_the_rest():
    batch = {"ids": torch.ones(2), "pair": (torch.zeros(1), "text"), "n": 3}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["n"] == 3 and moved["pair"][1] == "text" and isinstance(moved["pair"], tuple)
    assert torch.equal(moved["ids"], batch["ids"])


def test_peak_device_memory_is_zero_on_cpu():
    with PeakDeviceMemory(torch.device("cpu")) as mem:
        torch.ones(1000)
    assert mem.peak_mb == 0.0


# Each behaviour test runs on the CPU (default suite) and on CUDA where there is one (marked `gpu`).
DEVICES = ["cpu", pytest.param("cuda", marks=GPU_ONLY)]


@pytest.fixture(scope="module")
def memorised_cpu():
    torch.manual_seed(0)
    fmt = PromptFormat()
    tokenizer = train_bpe_tokenizer([fmt.prompt(q) + " " + a for q, a in PAIRS] * 4, vocab_size=300)
    model = build_small_llama(tokenizer, SmallLlamaShape(64, 128, 2, 4, 64), seed=0)
    train_on_qa(model, tokenizer, fmt, PAIRS, epochs=150, lr=5e-3, batch_size=4, target_loss=0.01)
    return model, tokenizer, fmt


@gpu
def test_cuda_scores_and_generations_match_the_cpu(memorised_cpu):
    model, tokenizer, fmt = memorised_cpu
    on_gpu = copy.deepcopy(model).to("cuda")
    cpu_scores = score_answers(CausalLMLogits(model), tokenizer, fmt, PAIRS)
    gpu_scores = score_answers(CausalLMLogits(on_gpu), tokenizer, fmt, PAIRS)
    for c, g in zip(cpu_scores, gpu_scores):
        assert c.n_tokens == g.n_tokens
        assert g.sum_log_prob == pytest.approx(c.sum_log_prob, abs=1e-3)
    prompts = [fmt.prompt(q) for q, _ in PAIRS]
    assert greedy_generate(CausalLMLogits(on_gpu), tokenizer, prompts, 24) == \
        greedy_generate(CausalLMLogits(model), tokenizer, prompts, 24) == [a for _, a in PAIRS]


@pytest.mark.parametrize("device", DEVICES)
def test_base_training_memorises_on_the_device(memorised_cpu, device):
    _, tokenizer, fmt = memorised_cpu
    model = build_small_llama(tokenizer, SmallLlamaShape(64, 128, 2, 4, 64), seed=0).to(device)
    with PeakDeviceMemory(torch.device(device)) as mem:
        report = train_on_qa(model, tokenizer, fmt, PAIRS, epochs=150, lr=5e-3, batch_size=4, target_loss=0.01)
    assert report.final_loss <= 0.01 and (mem.peak_mb > 0.0) == (device == "cuda")
    assert greedy_generate(CausalLMLogits(model), tokenizer, [fmt.prompt(q) for q, _ in PAIRS], 24) == \
        [a for _, a in PAIRS]


@pytest.mark.parametrize("device", DEVICES)
def test_uld_assistant_trains_and_the_composite_forgets_on_the_device(memorised_cpu, device):
    from expunge_ml.methods.uld import ULDConfig, build_assistant, train_assistant

    model, tokenizer, fmt = memorised_cpu
    base = copy.deepcopy(model).to(device).requires_grad_(False)
    config = ULDConfig(n_layers=1, lora_r=8, lora_alpha=16, lora_dropout=0.0, weight=-1.0, relative_top=0.0,
                       epochs=60, lr=1e-2, batch_size=2, retain_weight=5.0, target_forget_loss=0.05)
    assistant = build_assistant(base, config)
    assert {p.device.type for p in assistant.parameters()} == {device}
    report = train_assistant(assistant, tokenizer, fmt, PAIRS[:1], PAIRS[1:], config)
    assert report.forget_nll <= 0.5
    composite = CompositeLogits(base, [assistant], [config.weight])
    before = score_answers(CausalLMLogits(base), tokenizer, fmt, PAIRS)
    after = score_answers(composite, tokenizer, fmt, PAIRS)
    assert after[0].mean_log_prob < before[0].mean_log_prob - 1.0  # the forget answer lost probability
    assert greedy_generate(composite, tokenizer, [fmt.prompt(PAIRS[0][0])], 24) != [PAIRS[0][1]]


@gpu
def test_cuda_assistant_reloads_next_to_its_base(memorised_cpu, tmp_path):
    from expunge_ml.methods.uld import ULDConfig, build_assistant, load_assistant, save_assistant

    model, tokenizer, fmt = memorised_cpu
    base = copy.deepcopy(model).to("cuda").requires_grad_(False)
    config = ULDConfig(n_layers=1, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    assistant = build_assistant(base, config)
    save_assistant(assistant, config, tmp_path / "a")
    loaded, loaded_config = load_assistant(base, tmp_path / "a")
    assert {p.device.type for p in loaded.parameters()} == {"cuda"} and loaded_config == config


@pytest.mark.parametrize("device", DEVICES)
def test_npo_lowers_the_forget_answer_on_the_device(memorised_cpu, device):
    from expunge_ml.corpus import QARecord
    from expunge_ml.methods.registry import get_method, make_config

    model, tokenizer, fmt = memorised_cpu
    records = [QARecord(record_id=f"r{i}", subject=f"s{i}", question=q, answer=a) for i, (q, a) in enumerate(PAIRS)]
    on_device = copy.deepcopy(model).to(device)
    before = score_answers(CausalLMLogits(on_device), tokenizer, fmt, PAIRS[:1])[0].mean_log_prob
    get_method("npo").unlearn(on_device, tokenizer, fmt, records[:1], records[1:],
                              make_config("npo", {"epochs": 3, "lr": 5e-3, "batch_size": 1}))
    assert {p.device.type for p in on_device.parameters()} == {device}
    after = score_answers(CausalLMLogits(on_device), tokenizer, fmt, PAIRS[:1])[0].mean_log_prob
    assert after < before - 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_copies_stay_on_the_device(memorised_cpu, device):
    from expunge_ml.quantization import nf4_quantized_copy, quantized_copy

    model, tokenizer, fmt = memorised_cpu
    on_device = copy.deepcopy(model).to(device)
    clones = [quantized_copy(on_device, bits=8, group_size=32)]
    try:
        import bitsandbytes  # noqa: F401  (NF4 needs it; an accelerator image may lack it)

        clones.append(nf4_quantized_copy(on_device))
    except ImportError:
        pass
    for clone in clones:
        assert {p.device.type for p in clone.parameters()} == {device}
        scores = score_answers(CausalLMLogits(clone), tokenizer, fmt, PAIRS)
        assert all(s.mean_log_prob > -1.0 for s in scores)  # a memorised model survives 8-bit and NF4


def test_settings_device_and_dtype_come_from_the_environment_then_the_profile(tmp_path, monkeypatch):
    from expunge.settings import Settings

    monkeypatch.delenv("EXPUNGE_DEVICE", raising=False)
    assert Settings(home=tmp_path, profile_name="tiny").device == "auto"  # the profile's runtime.device
    profile = tmp_path / "p.yaml"
    profile.write_text("runtime: {device: cpu}\n")
    assert Settings(home=tmp_path, profile_name=str(profile)).device == "cpu"
    profile.write_text("world: {n_people: 2}\n")  # no runtime block: auto
    assert Settings(home=tmp_path, profile_name=str(profile)).device == "auto"
    monkeypatch.setenv("EXPUNGE_DEVICE", "cuda:1")
    assert Settings(home=tmp_path, profile_name="tiny").device == "cuda:1"
    # the same order for the precision the base is loaded in
    monkeypatch.delenv("EXPUNGE_DTYPE", raising=False)
    assert Settings(home=tmp_path, profile_name=str(profile)).dtype == "float32"
    profile.write_text("runtime: {dtype: bfloat16}\n")
    assert Settings(home=tmp_path, profile_name=str(profile)).dtype == "bfloat16"
    monkeypatch.setenv("EXPUNGE_DTYPE", "float16")
    assert Settings(home=tmp_path, profile_name=str(profile)).dtype == "float16"
    # … and for torch's CPU threads (none: torch's default)
    monkeypatch.delenv("EXPUNGE_THREADS", raising=False)
    assert Settings(home=tmp_path, profile_name=str(profile)).threads is None
    profile.write_text("runtime: {threads: 2}\n")
    assert Settings(home=tmp_path, profile_name=str(profile)).threads == 2
    monkeypatch.setenv("EXPUNGE_THREADS", "1")
    assert Settings(home=tmp_path, profile_name=str(profile)).threads == 1
    monkeypatch.setenv("EXPUNGE_THREADS", "0")
    with pytest.raises(ValueError, match="at least 1"):
        Settings(home=tmp_path, profile_name=str(profile)).threads


def test_resolve_dtype_names():
    from expunge_ml.devices import resolve_dtype

    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(" Float16 ") is torch.float16
    assert resolve_dtype(None) is torch.float32 and resolve_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")


@pytest.mark.parametrize("device", DEVICES)
def test_a_bfloat16_base_serves_trains_an_assistant_and_reloads(memorised_cpu, device, tmp_path):
    """A user's large base would be loaded in bfloat16: loading, scoring, the assistant and its reload work."""
    from expunge_ml.methods.uld import ULDConfig, build_assistant, load_assistant, save_assistant, train_assistant
    from expunge_ml.modeling import load_causal_lm

    model, tokenizer, fmt = memorised_cpu
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    base, _ = load_causal_lm(str(tmp_path / "base"), dtype="bfloat16", device=device)
    base.requires_grad_(False)
    assert {p.dtype for p in base.parameters()} == {torch.bfloat16}
    before = score_answers(CausalLMLogits(base), tokenizer, fmt, PAIRS)
    assert all(s.mean_log_prob > -0.5 for s in before)  # bf16 rounding keeps a memorised model memorised
    config = ULDConfig(n_layers=1, lora_r=8, lora_alpha=16, lora_dropout=0.0, weight=-1.0, relative_top=0.0,
                       epochs=60, lr=1e-2, batch_size=2, retain_weight=5.0, target_forget_loss=0.05)
    assistant = build_assistant(base, config)
    report = train_assistant(assistant, tokenizer, fmt, PAIRS[:1], PAIRS[1:], config)
    assert math.isfinite(report.forget_nll) and report.forget_nll <= 0.5
    after = score_answers(CompositeLogits(base, [assistant], [config.weight]), tokenizer, fmt, PAIRS[:1])
    assert after[0].mean_log_prob < before[0].mean_log_prob - 1.0
    save_assistant(assistant, config, tmp_path / "adapter")
    reloaded, _ = load_assistant(base, tmp_path / "adapter")
    again = score_answers(CompositeLogits(base, [reloaded], [config.weight]), tokenizer, fmt, PAIRS[:1])
    assert again[0].mean_log_prob == pytest.approx(after[0].mean_log_prob, abs=1e-2)
