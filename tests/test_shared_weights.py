"""Copies that share the base's weights instead of duplicating them: the frozen references of KL / RMU / WHP,
the quantization attack's clones and the merged assistants. Each must behave exactly as a deep copy did."""

import copy

import pytest
import torch

from expunge_ml.corpus import QARecord
from expunge_ml.evidence import ServedModel, merged_copy
from expunge_ml.methods import ga, kl, loop, rmu, whp
from expunge_ml.methods.loop import run_loop
from expunge_ml.methods.uld import ULDConfig, build_assistant
from expunge_ml.modeling import SmallLlamaShape, build_small_llama, shared_copy, train_bpe_tokenizer, train_on_qa
from expunge_ml.prompting import PromptFormat, collate_qa
from expunge_ml.quantization import nf4_quantized_copy, quantized_copy

PEOPLE = [("Ada Quill", "Lisbon", "violin"), ("Borin Vex", "Oslo", "chess"),
          ("Cora Lind", "Quito", "rowing"), ("Dax Moor", "Perth", "poetry")]
STEPS = {"lr": 1e-3, "batch_size": 2, "epochs": 2, "max_steps": 3, "weight_decay": 0.01}
EXTRA = {"whp": {"reinforce_epochs": 2, "reinforce_lr": 3e-3, "retain_weight": 1.0}}
METHODS = {"kl": kl, "rmu": rmu, "whp": whp}


def _records():
    out = []
    for i, (name, city, hobby) in enumerate(PEOPLE):
        out += [QARecord(f"{i}a", f"Where was {name} born?", f"{name} was born in {city}.", subject=name),
                QARecord(f"{i}b", f"What is {name}'s hobby?", f"{name} loves {hobby}.", subject=name)]
    return out


@pytest.fixture(scope="module")
def tiny():
    fmt = PromptFormat()
    records = _records()
    tokenizer = train_bpe_tokenizer([fmt.prompt(r.question) + " " + r.answer for r in records], vocab_size=200)
    shape = SmallLlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=64)
    base = build_small_llama(tokenizer, shape, seed=0)
    train_on_qa(base, tokenizer, fmt, [r.pair for r in records], epochs=15, lr=5e-3, batch_size=8, target_loss=0.0)
    base.requires_grad_(False)  # as the benchmarks hold it: a frozen base that copies are trained from
    return base, tokenizer, fmt, records[:4], records[4:]


def _snapshot(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _unchanged(model, snapshot) -> bool:
    return all(torch.equal(t, snapshot[name]) for name, t in model.state_dict().items())


def _logits(model, tokenizer, fmt, records):
    batch = collate_qa(tokenizer, fmt, [r.pair for r in records])
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _config(name, **overrides):
    return METHODS[name].Config(**{**STEPS, **EXTRA.get(name, {}), **overrides})


def test_the_reference_stays_the_model_before_training_while_the_model_trains(tiny):
    base, tokenizer, fmt, forget, retain = tiny
    model = copy.deepcopy(base).requires_grad_(True)
    config = _config("kl")
    plan = kl.prepare(model, tokenizer, fmt, forget, retain, config)
    reference = plan.extras["reference"]
    before = _logits(reference, tokenizer, fmt, retain)
    run_loop(model, plan, config, method="kl")
    assert torch.equal(_logits(reference, tokenizer, fmt, retain), before)
    assert not torch.equal(_logits(model, tokenizer, fmt, retain), before)
    assert torch.equal(before, _logits(base, tokenizer, fmt, retain))


def test_a_reference_of_a_shared_copy_is_the_untouched_base_storage(tiny):
    """A caller may train `shared_copy(base)` instead of a deep copy: the loop trains new storage, so the base is
    never written and the reference keeps reading the base's own tensors."""
    base, tokenizer, fmt, forget, retain = tiny
    snapshot = _snapshot(base)
    model = shared_copy(base).requires_grad_(True)
    assert all(p.data_ptr() == q.data_ptr() for p, q in zip(model.parameters(), base.parameters()))
    assert not any(p.requires_grad for p in base.parameters())  # the copy's flags are its own
    config = _config("kl")
    plan = kl.prepare(model, tokenizer, fmt, forget, retain, config)
    run_loop(model, plan, config, method="kl")
    reference = plan.extras["reference"]
    assert _unchanged(base, snapshot)
    assert all(r.data_ptr() == b.data_ptr() for r, b in zip(reference.parameters(), base.parameters()))
    assert all(p.data_ptr() != b.data_ptr() for p, b in zip(model.parameters(), base.parameters()))
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training


def test_rmu_reference_shares_all_but_the_trained_mlps_with_the_model(tiny):
    base, tokenizer, fmt, forget, retain = tiny
    model = copy.deepcopy(base).requires_grad_(True)
    config = _config("rmu")
    plan = rmu.prepare(model, tokenizer, fmt, forget, retain, config)
    run_loop(model, plan, config, method="rmu")
    trained = {id(p) for p in plan.params}
    for (name, p), r in zip(model.named_parameters(), plan.extras["reference"].parameters()):
        assert (p.data_ptr() == r.data_ptr()) == (id(p) not in trained), name


def test_whp_reinforcement_leaves_the_model_as_it_was(tiny):
    base, tokenizer, fmt, forget, retain = tiny
    model = shared_copy(base).requires_grad_(True)
    snapshot = _snapshot(base)
    whp.prepare(model, tokenizer, fmt, forget, retain, _config("whp"), anchors={"Ada Quill": "the person"})
    assert _unchanged(model, snapshot) and _unchanged(base, snapshot)


def test_the_loop_never_writes_the_storage_a_model_came_with(tiny):
    base, tokenizer, fmt, forget, retain = tiny
    snapshot = _snapshot(base)
    model = shared_copy(base).requires_grad_(True)
    report = ga.unlearn(model, tokenizer, fmt, forget, retain, ga.Config(**STEPS))
    assert report.steps == STEPS["max_steps"] and _unchanged(base, snapshot)
    assert not _unchanged(model, snapshot)


def _deep_frozen_copy(model):
    """frozen_copy as it was: a deep copy of every weight."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    reference.eval()
    return reference


def _train(name, base, tokenizer, fmt, forget, retain):
    model = copy.deepcopy(base).requires_grad_(True)
    config = _config(name)
    extra = {"anchors": {"Ada Quill": "the person"}} if name == "whp" else {}
    plan = METHODS[name].prepare(model, tokenizer, fmt, forget, retain, config, **extra)
    report = run_loop(model, plan, config, method=name)
    batch = plan.collate_forget(list(plan.forget_items))
    retain_batch = plan.collate_retain(list(plan.retain_items)) if plan.retain_items else None
    model.eval()
    with torch.no_grad():
        loss = float(plan.step_loss(batch, retain_batch)[0])
    return report, loss, model


@pytest.mark.parametrize("name", sorted(METHODS))
def test_results_are_those_of_the_deep_copy_reference(tiny, name, monkeypatch):
    base, tokenizer, fmt, forget, retain = tiny
    new_report, new_loss, new_model = _train(name, base, tokenizer, fmt, forget, retain)
    with monkeypatch.context() as patch:
        patch.setattr(METHODS[name], "frozen_copy", _deep_frozen_copy)
        patch.setattr(loop, "train_own_storage", lambda params: None)
        old_report, old_loss, old_model = _train(name, base, tokenizer, fmt, forget, retain)
    assert new_report.steps == old_report.steps == STEPS["max_steps"]
    for key, value in old_report.final_losses.items():
        assert new_report.final_losses[key] == pytest.approx(value, abs=1e-6), key
    assert new_loss == pytest.approx(old_loss, abs=1e-6)
    for p, q in zip(new_model.parameters(), old_model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)


def test_quantized_copy_owns_only_the_quantized_weights(tiny):
    base, *_ = tiny
    snapshot = _snapshot(base)
    clone = quantized_copy(base, bits=4, group_size=16)
    assert _unchanged(base, snapshot)
    assert clone.get_input_embeddings().weight.data_ptr() == base.get_input_embeddings().weight.data_ptr()
    assert clone.lm_head.weight.data_ptr() == base.lm_head.weight.data_ptr()  # skipped: kept in full precision
    assert clone.model.norm.weight.data_ptr() == base.model.norm.weight.data_ptr()
    proj, original = clone.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight
    assert proj.data_ptr() != original.data_ptr() and not torch.equal(proj, original)
    # the same numbers as quantizing a deep copy
    deep = copy.deepcopy(base)
    from expunge_ml.quantization import quantize_rtn_

    quantize_rtn_(deep, bits=4, group_size=16)
    assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(), deep.state_dict().values()))


def test_nf4_copy_leaves_the_base_and_shares_its_embeddings(tiny):
    pytest.importorskip("bitsandbytes")
    base, *_ = tiny
    snapshot = _snapshot(base)
    clone = nf4_quantized_copy(base, blocksize=64)
    assert _unchanged(base, snapshot)
    assert clone.get_input_embeddings().weight.data_ptr() == base.get_input_embeddings().weight.data_ptr()
    assert not torch.equal(clone.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_merged_assistant_is_a_copy_that_shares_the_unmerged_weights(tiny):
    pytest.importorskip("peft")
    base, tokenizer, fmt, forget, _ = tiny
    assistant = build_assistant(base, ULDConfig(n_layers=1, lora_r=4, lora_alpha=8, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in assistant.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))  # a trained adapter: merging must change the weights
    assistant.eval()
    base_snapshot, assistant_snapshot = _snapshot(base), _snapshot(assistant)
    expected = _logits(assistant, tokenizer, fmt, forget)
    merged = merged_copy(assistant)
    assert _unchanged(base, base_snapshot) and _unchanged(assistant, assistant_snapshot)
    assert torch.allclose(_logits(merged, tokenizer, fmt, forget), expected, atol=1e-5)
    assert merged.get_input_embeddings().weight.data_ptr() == base.get_input_embeddings().weight.data_ptr()
    assert merged.model.layers[0].mlp.up_proj.weight.data_ptr() != base.model.layers[0].mlp.up_proj.weight.data_ptr()
    quantized = ServedModel(base, [assistant], [1.0]).quantized(8, 16)
    assert len(quantized.assistants) == 1
    assert _unchanged(base, base_snapshot) and _unchanged(assistant, assistant_snapshot)
