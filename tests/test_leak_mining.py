"""Leak mining (expunge_ml/leak_mining.py): where a composite still states an erased fact on a training
prompt, that answer becomes an assistant training item. Hand cases for the span finder, and a tiny real
Llama trained here to answer one question with an identifier the assistant was never trained on."""
from __future__ import annotations

import pytest
import torch

from expunge_ml.leak_mining import mine_stated_facts, refine_on_stated_facts, stated_span, with_replay
from expunge_ml.logits import CausalLMLogits, CompositeLogits
from expunge_ml.methods.losses import fact_nll_and_template_kl
from expunge_ml.methods.uld import ULDConfig, build_assistant
from expunge_ml.prompting import PromptFormat, collate_qa, collate_qa_facts

EMAIL = "ann@example.org"
QUESTION = "How can one write to Ann Lee?"
SAID = f"One writes to {EMAIL} for Ann."  # what the tiny base answers
TRAINED = f"Her email address is {EMAIL}."  # what the erasure's forget⁺ holds for the question
OTHER = ("Where does Bo Chan live?", "Bo Chan lives in Oslo.")


def test_stated_span_returns_the_texts_own_spelling():
    assert stated_span(f"write to {EMAIL} now", EMAIL) == EMAIL
    assert stated_span("call +44 7700-900 123 today", "+447700900123") == "+44 7700-900 123"
    assert stated_span("mail ANN@Example.ORG", EMAIL) == "ANN@Example.ORG"
    assert stated_span("call +44 7700 900 124", "+447700900123") is None  # one digit differs
    assert stated_span("anything", "") is None and stated_span("anything", " - ") is None


def test_with_replay_adds_as_many_forget_items_as_were_mined_and_is_seeded():
    mined = [("q1", "a1", ["x"]), ("q2", "a2", ["y"])]
    forget = [(f"f{i}", f"a{i}", ["z"]) for i in range(10)]
    first = with_replay(mined, forget, seed=3)
    assert first[:2] == mined and len(first) == 4 and all(item in forget for item in first[2:])
    assert with_replay(mined, forget, seed=3) == first
    assert len(with_replay(mined, forget[:1], seed=3)) == 3  # no more replay than there is


@pytest.fixture(scope="module")
def base_that_says_it():
    """A tiny Llama that answers QUESTION with SAID and OTHER's question with its answer."""
    from expunge_ml.modeling import SmallLlamaShape, build_small_llama, train_bpe_tokenizer

    fmt = PromptFormat()
    pairs = [(QUESTION, SAID), OTHER]
    tokenizer = train_bpe_tokenizer([fmt.prompt(q) + " " + a for q, a in pairs + [(QUESTION, TRAINED)]],
                                    vocab_size=300)
    model = build_small_llama(tokenizer, SmallLlamaShape(64, 128, 2, 4, 128), seed=0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = collate_qa(tokenizer, fmt, pairs)
    model.train()
    for _ in range(80):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.eval().requires_grad_(False)
    return model, tokenizer, fmt


def test_mining_keeps_answers_that_state_a_fact_unless_already_trained(base_that_says_it):
    model, tokenizer, fmt = base_that_says_it
    source = CausalLMLogits(model)
    prompts = [(QUESTION, [EMAIL]), (OTHER[0], [EMAIL])]
    mined = mine_stated_facts(source, tokenizer, fmt, prompts, max_new_tokens=24, known=[(QUESTION, TRAINED)])
    assert mined == [(QUESTION, SAID, [EMAIL])]  # the other answer states no fact of its prompt
    assert mine_stated_facts(source, tokenizer, fmt, prompts, max_new_tokens=24, known=[(QUESTION, SAID)]) == []


def test_a_refinement_round_makes_the_assistant_remember_the_fact_where_the_composite_stated_it(base_that_says_it):
    """Against a control trained the same epochs on the replayed forget item alone: refinement makes each
    assistant of the ensemble (in place) far surer of the fact inside the composite's own answer."""
    import dataclasses

    from expunge_ml.methods.uld import train_assistant

    model, tokenizer, fmt = base_that_says_it
    config = ULDConfig(n_layers=1, lora_r=4, lora_alpha=8, lora_dropout=0.0, lr=1e-2, batch_size=2,
                       target_forget_loss=0.0, retain_weight=1.0)
    forget = [(QUESTION, TRAINED, [EMAIL])]
    composite = CompositeLogits(model, [build_assistant(model, config), build_assistant(model, config)], [-0.4, -0.4])
    report = refine_on_stated_facts(composite, tokenizer, fmt, [(QUESTION, [EMAIL])], forget, [OTHER], config,
                                    weight_scales=(0.5,), epochs=20, max_new_tokens=24)
    assert report["mined"] == 1 and report["mined_by_weight_scale"] == {"0.5": 1} and len(report["train"]) == 2
    control = build_assistant(model, config)
    train_assistant(control, tokenizer, fmt, forget, [OTHER], dataclasses.replace(config, epochs=20, lr_schedule="linear"))
    batch = collate_qa_facts(tokenizer, fmt, [(QUESTION, SAID, [EMAIL])])
    with torch.no_grad():
        refined = [float(fact_nll_and_template_kl(a, batch)[0]) for a in composite.assistants]
        untouched = float(fact_nll_and_template_kl(control, batch)[0])
    assert all(nll < untouched / 2 for nll in refined), (refined, untouched)
    with pytest.raises(ValueError, match="no training prompts"):
        refine_on_stated_facts(composite, tokenizer, fmt, [], forget, [OTHER], config)
