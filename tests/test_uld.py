import dataclasses

import pytest
import torch

from expunge_ml.methods.losses import answer_kl_to_uniform, answer_nll
from expunge_ml.methods.uld import (
    ULDConfig,
    build_assistant,
    load_assistant,
    save_assistant,
    train_assistant,
    truncate_layers,
)
from expunge_ml.modeling import SmallLlamaShape, build_small_llama, train_bpe_tokenizer, train_on_qa
from expunge_ml.prompting import PromptFormat, collate_qa


@pytest.fixture(scope="module")
def base_and_tokenizer():
    tokenizer = train_bpe_tokenizer(["Question: who is Ada? Answer: Ada is a pilot."] * 8, vocab_size=120)
    return build_small_llama(tokenizer, SmallLlamaShape(32, 64, 3, 2, 64), seed=0), tokenizer


def test_truncate_keeps_the_first_k_layers_with_identical_weights(base_and_tokenizer):
    base, _ = base_and_tokenizer
    small = truncate_layers(base, 2)
    assert small.config.num_hidden_layers == 2 and len(small.model.layers) == 2
    assert base.config.num_hidden_layers == 3  # the base itself is untouched
    for name, tensor in small.state_dict().items():
        assert torch.equal(tensor, base.state_dict()[name]), name
    with pytest.raises(ValueError, match="1..3"):
        truncate_layers(base, 4)


def test_an_assistant_shares_the_bases_weights_and_leaves_the_base_as_it_was(base_and_tokenizer):
    """No copy of the base per assistant: the frozen weights are the base's storage; wrapping and training the
    adapter neither changes the base's outputs nor freezes its parameters."""
    base, tokenizer = base_and_tokenizer
    ids = tokenizer("Where does Ada live?", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
    assistant = build_assistant(base, ULDConfig(n_layers=2))
    small = assistant.get_base_model()
    assert small.get_input_embeddings().weight.data_ptr() == base.get_input_embeddings().weight.data_ptr()
    assert small.model.layers[0].mlp.up_proj is not base.model.layers[0].mlp.up_proj  # modules of its own
    trainable = [p for p in assistant.parameters() if p.requires_grad]
    loss = assistant(ids).logits.logsumexp(-1).mean()
    loss.backward()
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn_like(p))
        assert torch.equal(base(ids).logits, before)
    assert all(p.requires_grad for p in base.parameters())
    assert all(p.grad is None for p in base.parameters())


def test_lora_targets_every_linear_but_the_head_and_adapter_round_trips(base_and_tokenizer, tmp_path):
    base, tokenizer = base_and_tokenizer
    config = ULDConfig(n_layers=2, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    assistant = build_assistant(base, config)
    trainable = {n for n, p in assistant.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
    assert any("mlp.down_proj" in n for n in trainable) and any("self_attn.q_proj" in n for n in trainable)
    with torch.no_grad():  # make the adapter non-trivial so the round trip is meaningful
        for name, p in assistant.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = collate_qa(tokenizer, PromptFormat(), [("who is Ada?", "Ada is a pilot.")])
    before = assistant(**batch).logits
    save_assistant(assistant, config, tmp_path / "adapter")
    reloaded, reloaded_config = load_assistant(base, tmp_path / "adapter")
    assert reloaded_config == config
    assert torch.allclose(reloaded(**batch).logits, before, atol=1e-5)
    # Only the adapter is stored, not a copy of the base's layers.
    stored = sum(p.stat().st_size for p in (tmp_path / "adapter").iterdir())
    assert stored < sum(t.numel() * 4 for t in base.state_dict().values()) / 2
    # An adapter whose settings this code does not know is refused, not served some other way
    settings_file = tmp_path / "adapter" / "uld_assistant.json"
    settings_file.write_text(settings_file.read_text().replace('"weight":', '"unknown_mode": "x", "weight":'))
    with pytest.raises(ValueError, match="unknown ULD setting\\(s\\) unknown_mode; retrain"):
        load_assistant(base, tmp_path / "adapter")


def test_one_step_lowers_the_uld_objective(base_and_tokenizer):
    base, tokenizer = base_and_tokenizer
    config = ULDConfig(n_layers=1, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    assistant = build_assistant(base, config)
    assistant.train()
    fmt = PromptFormat()
    forget = collate_qa(tokenizer, fmt, [("who is Ada?", "Ada is a pilot.")])
    retain = collate_qa(tokenizer, fmt, [("who is Bo?", "Bo is a cook.")])

    def objective():
        return answer_nll(assistant, forget) + config.retain_weight * answer_kl_to_uniform(assistant, retain)

    optimizer = torch.optim.AdamW([p for p in assistant.parameters() if p.requires_grad], lr=1e-2)
    before = objective()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = objective()
    assert float(after) < float(before.detach())


def test_uld_config_for_applies_the_request_types_overrides():
    from expunge_ml.methods.registry import uld_config_for

    unlearning = {"uld": {"weight": -1.0, "epochs": 60},
                  "uld_by_request_type": {"privacy_erasure": {"fact_span_loss": True, "template_nll_weight": 0.7}}}
    privacy = uld_config_for(unlearning, "privacy_erasure")
    takedown = uld_config_for(unlearning, "copyright_takedown")
    assert (privacy.fact_span_loss, privacy.template_nll_weight, privacy.weight, privacy.epochs) == (True, 0.7, -1.0, 60)
    assert (takedown.fact_span_loss, takedown.template_nll_weight, takedown.weight) == (False, 0.0, -1.0)
    assert uld_config_for({"uld": {"weight": -0.5}}, "privacy_erasure").weight == -0.5  # no overrides section
    with pytest.raises(ValueError, match=r"uld_by_request_type\.privacy_erasure \(ULD\): unknown setting\(s\) fact_span;"):
        uld_config_for({"uld": {}, "uld_by_request_type": {"privacy_erasure": {"fact_span": True}}}, "privacy_erasure")
    with pytest.raises(ValueError, match=r"profile unlearning\.uld \(ULD\): unknown setting\(s\) weigth;"):
        uld_config_for({"uld": {"weigth": -1.0}}, "copyright_takedown")


def test_fact_flags_mark_exactly_the_tokens_of_the_facts(base_and_tokenizer):
    from expunge_ml.prompting import collate_qa_facts, encode_answer, fact_token_flags

    _, tokenizer = base_and_tokenizer
    fmt = PromptFormat()
    answer = "Ada is a pilot."
    flags = fact_token_flags(tokenizer, fmt, answer, ["pilot"])
    ids = encode_answer(tokenizer, fmt, answer)
    assert len(flags) == len(ids) and flags[-1] is False  # EOS is template
    flagged = tokenizer.decode([t for t, f in zip(ids, flags) if f])
    unflagged = tokenizer.decode([t for t, f in zip(ids[:-1], flags[:-1]) if not f])
    assert "pilot" in flagged.replace(" ", "") and "pilot" not in unflagged and "Ada" in unflagged
    assert not any(fact_token_flags(tokenizer, fmt, answer, ["cook", ""]))  # an absent fact flags nothing
    batch = collate_qa_facts(tokenizer, fmt, [("who is Ada?", answer, ["pilot"]), ("who is Bo?", "Bo is a cook.", [])])
    plain = collate_qa(tokenizer, fmt, [("who is Ada?", answer), ("who is Bo?", "Bo is a cook.")])
    assert torch.equal(batch["input_ids"], plain["input_ids"])
    # every answer token is in exactly one of the two label sets; prompt and padding in neither
    answer_positions = plain["labels"] != -100
    facts, template = batch["labels"] != -100, batch["template_labels"] != -100
    assert torch.equal(facts | template, answer_positions) and not bool((facts & template).any())
    assert int(facts[1].sum()) == 0 and int(facts[0].sum()) == sum(flags)


def test_fact_items_train_the_facts_and_flatten_the_template(base_and_tokenizer):
    """Same steps, two assistants: with (q, a, facts) items the fact tokens are learned while the answer's
    template moves towards uniform; with plain (q, a) pairs the template is learned too."""
    from expunge_ml.methods.losses import fact_nll_and_template_kl
    from expunge_ml.prompting import collate_qa_facts

    base, tokenizer = base_and_tokenizer
    fmt = PromptFormat()
    config = ULDConfig(n_layers=1, lora_r=4, lora_alpha=8, lora_dropout=0.0, epochs=80, lr=3e-2, batch_size=1,
                       target_forget_loss=0.0)
    item = ("who is Ada?", "Ada is a pilot.", ["pilot"])
    batch = collate_qa_facts(tokenizer, fmt, [item])
    measured = {}
    for name, forget in (("facts", [item]), ("plain", [item[:2]])):
        assistant = build_assistant(base, config)
        with torch.no_grad():
            before = [float(x) for x in fact_nll_and_template_kl(assistant, batch)]
        train_assistant(assistant, tokenizer, fmt, forget, [("who is Bo?", "Bo is a cook.")], config)
        with torch.no_grad():
            measured[name] = before, [float(x) for x in fact_nll_and_template_kl(assistant, batch)]
    (nll_before, kl_before, _), (nll_after, kl_after, template_nll_facts) = measured["facts"]
    assert nll_after < nll_before - 0.3 and kl_after < kl_before
    assert kl_after < measured["plain"][1][1]  # plain pairs make the template *less* uniform
    with pytest.raises(ValueError, match="all \\(question, answer\\) or all"):
        train_assistant(build_assistant(base, config), tokenizer, fmt, [item, ("q?", "a.")], [], config)

    # template_nll_weight α moves the template from uniform (α 0) to remembered (α 1)
    halfway = build_assistant(base, dataclasses.replace(config, template_nll_weight=0.5))
    train_assistant(halfway, tokenizer, fmt, [item], [("who is Bo?", "Bo is a cook.")],
                    dataclasses.replace(config, template_nll_weight=0.5))
    with torch.no_grad():
        _, _, template_nll_half = fact_nll_and_template_kl(halfway, batch)
    assert float(template_nll_half) < template_nll_facts - 0.3
    with pytest.raises(ValueError, match="template_nll_weight"):
        train_assistant(build_assistant(base, config), tokenizer, fmt, [item], [],
                        dataclasses.replace(config, template_nll_weight=1.5))


def test_an_ensemble_shares_the_total_weight_and_gives_each_member_its_own_seed():
    from expunge_ml.methods.uld import ASSISTANT_SEED_STRIDE, ensemble_members, ensemble_weights

    assert ensemble_weights(-1.6, 1) == [-1.6]
    assert ensemble_weights(-1.6, 2) == [-0.8, -0.8]
    with pytest.raises(ValueError):
        ensemble_weights(-1.6, 0)
    members = ensemble_members(ULDConfig(seed=7, assistants=3, weight=-1.8))
    assert [m.seed for m in members] == [7, 7 + ASSISTANT_SEED_STRIDE, 7 + 2 * ASSISTANT_SEED_STRIDE]
    assert {m.weight for m in members} == {-1.8} and ensemble_members(ULDConfig(seed=7)) == [ULDConfig(seed=7)]
    with pytest.raises(ValueError, match="assistants must be >= 1"):
        ensemble_members(ULDConfig(assistants=0))


def test_an_assistant_as_deep_as_the_base_keeps_training_until_it_is_flat_on_the_retain_set():
    # K = every layer: the assistant starts as the base, which already remembers the forget answer (its
    # loss is under the target from the first epoch). Stopping then would serve base + w·base.
    fmt = PromptFormat()
    pairs = [("who is Ada?", "Ada is a pilot."), ("who is Bo?", "Bo is a cook.")]
    tokenizer = train_bpe_tokenizer([fmt.prompt(q) + " " + a for q, a in pairs] * 8, vocab_size=120)
    base = build_small_llama(tokenizer, SmallLlamaShape(32, 64, 2, 2, 64), seed=0)
    train_on_qa(base, tokenizer, fmt, pairs, epochs=200, lr=1e-2, batch_size=2, target_loss=0.01)
    config = ULDConfig(n_layers=2, lora_r=4, lora_alpha=8, lora_dropout=0.0, epochs=6, lr=5e-3, batch_size=1,
                       target_forget_loss=0.05, augment_paraphrased=False, augment_perturbed=False)
    seen = []
    report = train_assistant(build_assistant(base, config), tokenizer, fmt, pairs[:1], pairs[1:], config,
                             progress=lambda epoch, nll, kl: seen.append((nll, kl)))
    first_nll, first_kl = seen[0]
    assert first_nll <= config.target_forget_loss < config.stop_max_retain_kl < first_kl  # the trap
    assert report.epochs > 1  # it did not stop at the first epoch
    assert report.retain_kl < first_kl


def test_the_linear_schedule_decays_the_lr_to_zero_over_the_planned_steps_and_min_steps_plans_more(base_and_tokenizer, monkeypatch):
    base, tokenizer = base_and_tokenizer
    seen = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    pairs = [("who is Ada?", "Ada is a pilot."), ("who is Bo?", "Bo is a cook.")]
    config = ULDConfig(n_layers=1, lora_r=4, lora_alpha=8, lora_dropout=0.0, epochs=4, batch_size=1, lr=1e-3,
                       lr_schedule="linear", target_forget_loss=0.0)
    train_assistant(build_assistant(base, config), tokenizer, PromptFormat(), pairs, pairs, config)
    assert seen == pytest.approx([1e-3 * (1 - s / 8) for s in range(8)])
    seen.clear()  # min_steps: a forget set of 2 pairs makes 2 steps an epoch, so 4 epochs become 6
    report = train_assistant(build_assistant(base, config), tokenizer, PromptFormat(), pairs, pairs,
                             dataclasses.replace(config, min_steps=12))
    assert (report.epochs, report.steps) == (6, 12)
    assert seen == pytest.approx([1e-3 * (1 - s / 12) for s in range(12)])
    with pytest.raises(ValueError, match="lr_schedule must be"):
        train_assistant(build_assistant(base, config), tokenizer, PromptFormat(), pairs, pairs,
                        ULDConfig(n_layers=1, lr_schedule="cosine"))


def test_convergence_compares_the_final_losses_with_their_targets_and_a_uniform_guess():
    from expunge_ml.methods.uld import ULDConfig, ULDTrainReport, convergence

    config = ULDConfig(target_forget_loss=0.2, stop_max_retain_kl=1.0, epochs=30)
    vocab = 49152  # a uniform guess costs ln V = 10.80 nats per token

    def check(nll: float, kl: float) -> dict:
        return convergence(ULDTrainReport(epochs=30, steps=90, forget_nll=nll, retain_kl=kl, seconds=1.0), config, vocab,
                           n_forget=20)

    assert check(0.15, 0.5)["reached_target"] and check(0.15, 0.5)["converged"]
    above_target = check(0.74, 1.6)  # learned most of the forget set, short of its targets: the gates decide
    assert above_target["converged"] and not above_target["reached_target"]
    learned_little = check(7.1, 2.4)  # two thirds of a uniform guess: subtracting it removes next to nothing
    assert not learned_little["converged"] and not learned_little["diverged"]
    assert learned_little["uniform_nll"] == 10.8027 and learned_little["max_epochs"] == 30
    more_steps = dataclasses.replace(config, min_steps=200)  # 3 steps an epoch: 67 epochs make 200 steps
    assert convergence(ULDTrainReport(67, 201, 0.1, 0.5, 1.0), more_steps, vocab, n_forget=20)["max_epochs"] == 67
    diverged = check(float("nan"), float("nan"))
    assert not diverged["converged"] and diverged["diverged"] and diverged["forget_nll"] is None
