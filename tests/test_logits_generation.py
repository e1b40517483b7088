import math

import pytest
import torch

from expunge_ml.generation import greedy_generate, score_answers
from expunge_ml.logits import MASKED_LOGIT, CausalLMLogits, CompositeLogits, combine_logits, keep_end_of_answer
from expunge_ml.modeling import SmallLlamaShape, build_small_llama, train_bpe_tokenizer, train_on_qa
from expunge_ml.prompting import PromptFormat

PAIRS = [
    ("Where does Ada live?", "Ada lives in Oslo."),
    ("What is the favourite colour of Bartholomew Quince?", "Bartholomew Quince likes green."),
    ("Who is Cy?", "Cy is a pilot."),
    ("What is the email address of Dee?", "dee@mail.example"),
]


@pytest.fixture(scope="module")
def memorised():
    fmt = PromptFormat()
    tokenizer = train_bpe_tokenizer([fmt.prompt(q) + " " + a for q, a in PAIRS] * 4, vocab_size=300)
    model = build_small_llama(tokenizer, SmallLlamaShape(64, 128, 2, 4, 64), seed=0)
    train_on_qa(model, tokenizer, fmt, PAIRS, epochs=150, lr=5e-3, batch_size=4, target_loss=0.01)
    return model, tokenizer, fmt


def test_combine_logits_by_hand():
    base = torch.tensor([[[2.0, 1.0, 0.0]]])
    assistant = torch.tensor([[[1.0, 0.0, 0.0]]])
    # z = z_base + (-0.5)·z_assistant = [2 - 0.5, 1, 0]
    assert torch.allclose(combine_logits(base, [assistant], [-0.5]), torch.tensor([[[1.5, 1.0, 0.0]]]))
    # τ = 0.3: log p_base = [-0.408, -1.408, -2.408]; max + log τ = -1.612 keeps tokens 0 and 1 only;
    # kept: [2 - 1, 1 - 1] = [1, 0]; token 2 is masked out (MASKED_LOGIT) though the assistant would boost it.
    filtered = combine_logits(base, [torch.tensor([[[1.0, 1.0, 4.0]]])], [-1.0], relative_top=0.3)
    assert torch.equal(filtered, torch.tensor([[[1.0, 0.0, MASKED_LOGIT]]]))
    # A uniform (constant) assistant changes no probability, with or without the filter.
    for tau in (0.0, 0.3):
        shifted = combine_logits(base, [torch.full((1, 1, 3), 5.0)], [-0.8], relative_top=tau)
        reference = combine_logits(base, [torch.zeros((1, 1, 3))], [-0.8], relative_top=tau)
        assert torch.allclose(torch.softmax(shifted, -1), torch.softmax(reference, -1))


def test_the_composite_never_lowers_the_end_of_answer_tokens_probability_below_the_bases():
    base = torch.tensor([[[2.0, 1.0, 0.5, 0.0], [0.0, 0.0, 3.0, 0.0]]])
    assistant = torch.tensor([[[0.0, 0.0, 4.0, 0.0], [0.0, 0.0, -2.0, 0.0]]])  # remembers where the answer ends
    end_ids = (2,)
    combined = keep_end_of_answer(combine_logits(base, [assistant], [-1.0]), base, end_ids)
    base_p, composite_p = torch.softmax(base, -1), torch.softmax(combined, -1)
    # First position: subtracting pushed the end token down, so it gets exactly the base's probability back ...
    assert torch.allclose(composite_p[0, 0, 2], base_p[0, 0, 2], atol=1e-6)
    # ... and the other tokens keep their composite proportions.
    plain_p = torch.softmax(combine_logits(base, [assistant], [-1.0]), -1)
    assert torch.allclose(composite_p[0, 0, [0, 1, 3]] / composite_p[0, 0, [0, 1, 3]].sum(),
                          plain_p[0, 0, [0, 1, 3]] / plain_p[0, 0, [0, 1, 3]].sum(), atol=1e-6)
    # Second position: the composite already ends more readily than the base; nothing changes.
    assert torch.allclose(composite_p[0, 1], plain_p[0, 1], atol=1e-6)
    # The relative-top filter cannot mask the end token away either.
    filtered = keep_end_of_answer(combine_logits(base, [assistant], [-1.0], relative_top=0.5), base, end_ids)
    assert torch.softmax(filtered, -1)[0, 0, 2] >= base_p[0, 0, 2] - 1e-6


def test_an_ensemble_adds_each_assistants_weighted_logits():
    base = torch.zeros((1, 1, 2))
    flat = torch.zeros((1, 1, 2))
    sharp = torch.tensor([[[math.log(3.0), 0.0]]])
    # z = 0 - 1·0 - 1·[ln 3, 0]
    assert torch.allclose(combine_logits(base, [flat, sharp], [-1.0, -1.0]), torch.tensor([[[-math.log(3.0), 0.0]]]))
    with pytest.raises(ValueError, match="one weight per assistant"):
        CompositeLogits(torch.nn.Identity(), [torch.nn.Identity()], [-1.0, -1.0])


def test_a_composite_subtracting_a_trained_model_changes_its_answers_and_at_w_0_is_the_model(memorised):
    model, tokenizer, fmt = memorised
    prompts = [fmt.prompt(q) for q, _ in PAIRS]
    base_answers = greedy_generate(CausalLMLogits(model), tokenizer, prompts, 16)
    assert greedy_generate(CompositeLogits(model, [model], [0.0]), tokenizer, prompts, 16) == base_answers
    subtracted = greedy_generate(CompositeLogits(model, [model], [-2.0]), tokenizer, prompts, 16)  # z = -z_base
    assert all(a.strip() != b.strip() for a, b in zip(subtracted, [a for _, a in PAIRS]))


def test_batched_left_padded_generation_equals_one_at_a_time(memorised):
    model, tokenizer, fmt = memorised
    source = CausalLMLogits(model)
    prompts = [fmt.prompt(q) for q, _ in PAIRS]
    batched = greedy_generate(source, tokenizer, prompts, max_new_tokens=32, batch_size=4)
    single = [greedy_generate(source, tokenizer, [p], max_new_tokens=32)[0] for p in prompts]
    assert batched == single
    assert batched == [a for _, a in PAIRS]  # it memorised, so greedy answers are the training answers


def test_teacher_forced_scores_match_a_manual_forward_pass(memorised):
    model, tokenizer, fmt = memorised
    scores = score_answers(CausalLMLogits(model), tokenizer, fmt, PAIRS, batch_size=3)
    prompt_ids = tokenizer(fmt.prompt(PAIRS[2][0]))["input_ids"]
    answer_ids = tokenizer(" " + PAIRS[2][1], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt_ids + answer_ids])).logits[0], -1)
    manual = sum(float(logp[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(answer_ids))
    assert scores[2].n_tokens == len(answer_ids)
    assert math.isclose(scores[2].sum_log_prob, manual, rel_tol=1e-4, abs_tol=1e-4)


def test_scores_from_the_kept_answer_positions_equal_those_from_every_position(memorised):
    """score_answers computes logits only where an answer is scored; a composite (relative top, end-of-answer
    floor) must give the same scores as from its logits at every position."""
    from expunge_ml.metrics import sequence_log_probs, shift_for_next_token
    from expunge_ml.prompting import collate_qa, position_ids_from_mask

    model, tokenizer, fmt = memorised
    composite = CompositeLogits(model, [model], [-0.5], relative_top=0.1)
    kept = score_answers(composite, tokenizer, fmt, PAIRS, batch_size=4)
    batch = collate_qa(tokenizer, fmt, PAIRS)
    with torch.no_grad():
        logits, _ = composite.step(batch["input_ids"], batch["attention_mask"],
                                   position_ids_from_mask(batch["attention_mask"]))
    sums, counts = sequence_log_probs(*shift_for_next_token(logits, batch["labels"]))
    assert [s.n_tokens for s in kept] == counts.tolist()
    assert [s.sum_log_prob for s in kept] == pytest.approx(sums.tolist(), rel=1e-4, abs=1e-4)


def test_composite_with_zero_weight_is_the_base_and_negative_weight_changes_answers(memorised):
    model, tokenizer, fmt = memorised
    prompts = [fmt.prompt(q) for q, _ in PAIRS]
    base_answers = greedy_generate(CausalLMLogits(model), tokenizer, prompts, 16)
    same = greedy_generate(CompositeLogits(model, [model], [0.0]), tokenizer, prompts, 16)
    assert same == base_answers
    # Subtracting a copy of the model itself with w = -2 inverts its preferences: answers must change.
    inverted = greedy_generate(CompositeLogits(model, [model], [-2.0]), tokenizer, prompts, 16)
    assert all(a != b for a, b in zip(inverted, base_answers))


def test_generation_passes_the_kv_cache_by_the_name_the_installed_transformers_takes(memorised):
    import inspect
    import warnings

    from expunge_ml.logits import cache_argument
    from expunge_ml.methods.uld import ULDConfig, build_assistant

    model, tokenizer, fmt = memorised
    expected = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    assistant = build_assistant(model, ULDConfig(n_layers=1, lora_r=4, lora_alpha=8))
    assert cache_argument(model) == expected and cache_argument(assistant) == expected  # peft wrapper: its base's
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recent transformers warn on the old name; generation must not trigger it
        plain = greedy_generate(CausalLMLogits(model), tokenizer, [fmt.prompt(PAIRS[0][0])], max_new_tokens=6)
        composite = greedy_generate(CompositeLogits(model, [assistant], [-0.5]), tokenizer,
                                    [fmt.prompt(PAIRS[0][0])], max_new_tokens=6)
    assert plain[0].strip().startswith("Ada lives") and isinstance(composite[0], str)
