"""Baseline unlearning methods: hand-computed losses, and one real optimisation step on a tiny Llama."""

import copy
import math

import pytest
import torch

from expunge_ml.corpus import QARecord
from expunge_ml.methods import ga, graddiff, idkdpo, kl, npo, rmu, simnpo, whp
from expunge_ml.methods.losses import answer_logits, answer_nll, kl_to_reference, masked_mse, token_nll
from expunge_ml.devices import to_device
from expunge_ml.methods.loop import LoopConfig, Plan, run_loop
from expunge_ml.methods.registry import ASSISTANT, BASELINES, METHODS, get_method, make_config, method_entry
from expunge_ml.modeling import SmallLlamaShape, build_small_llama, train_bpe_tokenizer, train_on_qa
from expunge_ml.prompting import IGNORE_INDEX, PromptFormat

LN2, LN3 = math.log(2.0), math.log(3.0)

PEOPLE = [
    ("Ada Quill", "Lisbon", "violin", "1961"), ("Borin Vex", "Oslo", "chess", "1974"),
    ("Cora Lind", "Quito", "rowing", "1988"), ("Dax Moor", "Perth", "poetry", "1953"),
    ("Elna Roff", "Turin", "pottery", "1990"), ("Fenn Okar", "Hanoi", "cycling", "1947"),
]


def _records():
    out = []
    for i, (name, city, hobby, year) in enumerate(PEOPLE):
        out += [
            QARecord(f"{i}a", f"Where was {name} born?", f"{name} was born in {city}.", subject=name),
            QARecord(f"{i}b", f"What is {name}'s hobby?", f"{name} loves {hobby}.", subject=name),
            QARecord(f"{i}c", f"When was {name} born?", f"{name} was born in {year}.", subject=name),
        ]
    return out


@pytest.fixture(scope="session")
def tiny_lm():
    """One tiny Llama per session, briefly trained on the QA so reference-based losses are not trivial."""
    fmt = PromptFormat()
    records = _records()
    texts = [fmt.prompt(r.question) + " " + r.answer for r in records] + list(idkdpo.DEFAULT_IDK_ANSWERS)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    shape = SmallLlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=64)
    model = build_small_llama(tokenizer, shape, seed=0)
    train_on_qa(model, tokenizer, fmt, [r.pair for r in records], epochs=40, lr=5e-3, batch_size=18, target_loss=0.0)
    forget, retain = records[:4], records[6:10]
    return model, tokenizer, fmt, forget, retain


# ------------------------------------------------------------------ hand-computed losses


def test_token_nll_and_ga_loss_by_hand():
    # t0: logits [0,0,0], label 1      -> NLL = ln3
    # t1: logits [ln2,0,0], label 0    -> p = 2/4 -> NLL = ln2
    # t2: label IGNORE (not counted, whatever its logits)
    logits = torch.tensor([[[0.0, 0.0, 0.0], [LN2, 0.0, 0.0], [9.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, 0, IGNORE_INDEX]])
    nll = token_nll(logits, labels)
    assert float(nll) == pytest.approx((LN3 + LN2) / 2)  # = ln6/2 ≈ 0.895880
    assert float(ga.loss_ga(nll)) == pytest.approx(-0.8958797346)


def test_graddiff_loss_by_hand():
    f, r = torch.tensor(2.0), torch.tensor(0.5)
    assert float(graddiff.loss_graddiff(f, r)) == pytest.approx(-1.5)  # −2 + 1·0.5
    assert float(graddiff.loss_graddiff(f, r, retain_weight=2.0)) == pytest.approx(-1.0)  # −2 + 2·0.5


def test_kl_loss_by_hand():
    # counted position: p_ref = softmax[0,0] = [.5,.5]; p = softmax[ln3,0] = [.75,.25]
    # KL(p_ref‖p) = .5·ln(.5/.75) + .5·ln(.5/.25) = .5·ln(4/3) ≈ 0.143841
    # second position is masked out (its KL would be large)
    ref = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    cur = torch.tensor([[[LN3, 0.0], [-5.0, 5.0]]])
    mask = torch.tensor([[True, False]])
    assert float(kl_to_reference(ref, cur, mask)) == pytest.approx(0.5 * math.log(4 / 3))
    assert float(kl_to_reference(ref, ref, mask)) == pytest.approx(0.0, abs=1e-7)
    # −NLL(forget) + λ·KL = −1 + 2·0.143841 = −0.712318
    assert float(kl.loss_kl(torch.tensor(1.0), ref, cur, mask, retain_weight=2.0)) == pytest.approx(-0.7123179276)


def test_npo_loss_by_hand():
    # log-ratio 0 -> (2/β)·ln(1 + 1) = 20·ln2 ≈ 13.862944 (β = 0.1)
    assert float(npo.loss_npo(torch.tensor([-7.0]), torch.tensor([-7.0]), beta=0.1)) == pytest.approx(20 * LN2)
    # rows with log-ratio 0 and −10: mean(20·ln2, 20·ln(1 + e^{−1})) = (13.862944 + 6.265234)/2 = 10.064089
    value = npo.loss_npo(torch.tensor([-3.0, -15.0]), torch.tensor([-3.0, -5.0]), beta=0.1)
    assert float(value) == pytest.approx(10.0640886808)


def test_simnpo_loss_by_hand():
    # log π = −3 over |y| = 3 tokens -> mean −1; β = 2.5, δ = 0:
    # −(2/2.5)·log σ(2.5) = 0.8·ln(1 + e^{−2.5}) ≈ 0.063112
    lp, n = torch.tensor([-3.0]), torch.tensor([3])
    assert float(simnpo.loss_simnpo(lp, n, beta=2.5)) == pytest.approx(0.0631117874)
    # δ = 0.5: 0.8·ln(1 + e^{−2}) ≈ 0.101542
    assert float(simnpo.loss_simnpo(lp, n, beta=2.5, delta=0.5)) == pytest.approx(0.1015424088)
    # length normalisation: the same mean log-prob over 6 tokens gives the same loss
    assert float(simnpo.loss_simnpo(torch.tensor([-6.0]), torch.tensor([6]))) == pytest.approx(0.0631117874)


def test_dpo_loss_by_hand():
    # all log-ratios 0 -> (2/β)·ln2 = 20·ln2
    z = torch.tensor([-4.0])
    assert float(idkdpo.loss_dpo(z, z, z, z, beta=0.1)) == pytest.approx(20 * LN2)
    # chosen: −1 vs ref −2 (+1); rejected: −3 vs ref −1 (−2); margin 3
    # −20·log σ(0.1·3) = 20·ln(1 + e^{−0.3}) ≈ 11.087105
    value = idkdpo.loss_dpo(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-1.0]))
    assert float(value) == pytest.approx(11.0871048894)


def test_rmu_loss_by_hand():
    # forget: h = [[1,2],[3,4]] (T=2, D=2), control c·u = [1,0], only t0 counted:
    #   mean((1−1)², (2−0)²) = 2
    # retain: h = [1,1], frozen = [0,1] -> mean(1, 0) = 0.5; α = 100 -> 50; total 52
    fh = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    control = torch.tensor([1.0, 0.0])
    fmask = torch.tensor([[True, False]])
    assert float(masked_mse(fh, control, fmask)) == pytest.approx(2.0)
    rh, frozen, rmask = torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[0.0, 1.0]]]), torch.tensor([[True]])
    assert float(rmu.loss_rmu(fh, control, fmask, rh, frozen, rmask, alpha=100.0)) == pytest.approx(52.0)


def test_whp_generic_logits_and_labels_by_hand():
    # v_base = [1,3,2], v_reinforced = [1,5,2]: ReLU(diff) = [0,2,0]
    # v_generic = [1, 3 − 5·2, 2] = [1,−7,2]: the boosted token 1 loses to token 2
    base, boosted = torch.tensor([[[1.0, 3.0, 2.0]]]), torch.tensor([[[1.0, 5.0, 2.0]]])
    assert whp.generic_logits(base, boosted, alpha=5.0).tolist() == [[[1.0, -7.0, 2.0]]]
    assert whp.generic_labels(base, boosted, torch.tensor([[0]]), alpha=5.0).tolist() == [[2]]
    assert whp.generic_labels(base, boosted, torch.tensor([[IGNORE_INDEX]])).tolist() == [[IGNORE_INDEX]]
    # the fine-tuning loss is the NLL of those labels: softmax[0,0,0] -> ln3
    assert float(whp.loss_whp(torch.zeros(1, 1, 3), torch.tensor([[2]]))) == pytest.approx(LN3)


def test_whp_anchored_replacement():
    anchors = {"Ada": "she", "Ada Quill": "the person", "+44 7700 900": "a phone number"}
    text = "Ada Quill met ada in Adamstown; call +44 7700 900."
    assert whp.replace_anchored(text, anchors) == "the person met she in Adamstown; call a phone number."
    assert whp.replace_anchored(text, {}) == text


# ------------------------------------------------------------------ model paths


def test_answer_position_logits_match_the_full_forward(tiny_lm):
    """The losses read the head only at answer positions; they must equal the full forward's values."""
    model, tokenizer, fmt, forget, retain = tiny_lm
    from expunge_ml.methods.losses import answer_kl_to_uniform
    from expunge_ml.metrics import kl_uniform_to_model, shift_for_next_token
    from expunge_ml.prompting import collate_qa

    batch = collate_qa(tokenizer, fmt, [r.pair for r in forget + retain])
    with torch.no_grad():
        full = model(**batch)
        shifted, labels = shift_for_next_token(full.logits, batch["labels"])
        assert float(answer_nll(model, batch)) == pytest.approx(float(full.loss), rel=1e-5)
        assert float(answer_kl_to_uniform(model, batch)) == pytest.approx(
            float(kl_uniform_to_model(shifted, labels != IGNORE_INDEX)), rel=1e-5)
        kept, kept_labels = answer_logits(model, batch)
        assert kept.shape[1] < shifted.shape[1]  # the prompt positions are not computed at all
        assert int((kept_labels != IGNORE_INDEX).sum()) == int((labels != IGNORE_INDEX).sum())


ONE_STEP = {"lr": 1e-3, "batch_size": 4, "epochs": 1, "max_steps": 1, "weight_decay": 0.0}
EXTRA = {"whp": {"reinforce_epochs": 2, "reinforce_lr": 3e-3, "retain_weight": 1.0}}


def _full_loss(plan, model):
    """The method's own step loss on the whole (single-batch) forget and retain sets."""
    device = next(model.parameters()).device
    fb = to_device(plan.collate_forget(list(plan.forget_items)), device)
    rb = to_device(plan.collate_retain(list(plan.retain_items)), device) if plan.retain_items else None
    model.eval()
    with torch.no_grad():
        return float(plan.step_loss(fb, rb)[0])


@pytest.mark.parametrize("name", BASELINES)
def test_one_step_lowers_own_loss(tiny_lm, name):
    base, tokenizer, fmt, forget, retain = tiny_lm
    model = copy.deepcopy(base)
    module = get_method(name)
    config = make_config(name, {**ONE_STEP, **EXTRA.get(name, {})})
    extra = {"anchors": {"Ada Quill": "the person"}} if name == "whp" else {}
    plan = module.prepare(model, tokenizer, fmt, forget, retain, config, **extra)
    assert len(plan.forget_items) == len(plan.retain_items or retain) == config.batch_size  # one batch each
    before = _full_loss(plan, model)
    report = run_loop(model, plan, config, method=name)
    after = _full_loss(plan, model)
    assert report.steps == 1
    assert after < before, f"{name}: {before} -> {after}"


@pytest.mark.parametrize("name", BASELINES)
def test_unlearn_runs_and_changes_the_model(tiny_lm, name):
    base, tokenizer, fmt, forget, retain = tiny_lm
    model = copy.deepcopy(base)
    config = make_config(name, {**ONE_STEP, "max_steps": 2, "batch_size": 2, **EXTRA.get(name, {})})
    seen = []
    report = get_method(name).unlearn(model, tokenizer, fmt, forget, retain, config,
                                      progress=lambda e, losses: seen.append((e, losses)))
    assert report.method == name and report.steps == 2 and report.epochs == 1
    assert "loss" in report.final_losses and all(math.isfinite(v) for v in report.final_losses.values())
    assert seen and seen[-1][1] == report.final_losses
    changed = any(not torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))
    assert changed and not model.training
    assert all(p.requires_grad for p in model.parameters())  # frozen-for-the-run flags restored


def test_rmu_only_updates_mlps_up_to_layer(tiny_lm):
    base, tokenizer, fmt, forget, retain = tiny_lm
    model = copy.deepcopy(base)
    config = rmu.Config(**ONE_STEP)  # 2 layers -> ℓ = 0: only layer 0's MLP may move
    plan = rmu.prepare(model, tokenizer, fmt, forget, retain, config)
    assert plan.extras["layer"] == 0 and plan.extras["updated_layers"] == [0]
    run_loop(model, plan, config, method="rmu")
    moved = {n for (n, p), q in zip(model.named_parameters(), base.parameters()) if not torch.equal(p, q)}
    assert moved and all(".layers.0.mlp." in n for n in moved), moved


def test_rmu_hidden_state_is_the_layer_output(tiny_lm):
    # hidden_states[0] is the embedding output, so decoder layer ℓ's output must sit at index ℓ+1.
    model, tokenizer, fmt, forget, _ = tiny_lm
    from expunge_ml.prompting import collate_qa

    batch = collate_qa(tokenizer, fmt, [r.pair for r in forget])
    captured = []
    handle = rmu.decoder_layers(model)[0].register_forward_hook(
        lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            h = rmu.hidden_at(model, batch, 0)
    finally:
        handle.remove()
    assert h.shape == (*batch["input_ids"].shape, 32)
    assert torch.allclose(h, captured[0])


def test_idkdpo_uses_given_refusals(tiny_lm):
    base, tokenizer, fmt, forget, retain = tiny_lm
    plan = idkdpo.prepare(copy.deepcopy(base), tokenizer, fmt, forget, retain, idkdpo.Config(**ONE_STEP),
                          idk_answers=["No comment."])
    assert {item[2] for item in plan.forget_items} == {"No comment."}
    with pytest.raises(ValueError):
        idkdpo.prepare(base, tokenizer, fmt, forget, retain, idkdpo.Config(), idk_answers=[])


# ------------------------------------------------------------------ loop and registry


def test_loop_balances_and_cycles_retain():
    model = torch.nn.Linear(2, 1)
    calls = []

    def step_loss(fb, rb):
        calls.append((list(fb), list(rb)))
        return model.weight.sum() * 0 + model.bias.sum(), {"n": float(len(fb))}

    plan = Plan(step_loss, list(range(5)), list, ["a", "b", "c"], list)
    report = run_loop(model, plan, LoopConfig(epochs=2, batch_size=2), method="toy")
    assert report.steps == 6 and report.epochs == 2  # ceil(5/2) = 3 steps per epoch
    assert sorted(x for f, _ in calls[:3] for x in f) == [0, 1, 2, 3, 4]  # an epoch covers the forget set
    assert all(len(r) == 2 for _, r in calls)  # every step gets a full retain batch
    retain_seen = [x for _, r in calls for x in r]
    assert {retain_seen.count(x) for x in "abc"} == {4}  # 12 draws cycle 3 items evenly
    assert report.final_losses["n"] == pytest.approx(5 / 3)  # last epoch: batches of 2, 2, 1
    limited = run_loop(model, plan, LoopConfig(epochs=5, batch_size=2, max_steps=4), method="toy")
    assert limited.steps == 4 and limited.epochs == 2
    with pytest.raises(ValueError):
        run_loop(model, Plan(step_loss, [], list), LoopConfig(), method="toy")


def test_registry():
    assert set(BASELINES) == {"ga", "graddiff", "kl", "npo", "simnpo", "idkdpo", "rmu", "whp"}
    assert set(METHODS) == {*BASELINES, "uld"} and method_entry(" ULD ").trains == ASSISTANT
    assert get_method(" NPO ") is npo
    with pytest.raises(ValueError, match="graddiff"):
        get_method("gradient-surgery")
    assert make_config("npo", {"beta": 0.2}).beta == 0.2
    with pytest.raises(ValueError, match="betta"):
        make_config("npo", {"betta": 0.2})
