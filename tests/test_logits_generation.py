import math

import pytest
import torch

from expunge_ml.generation import greedy_generate, score_answers
from expunge_ml.logits import MASKED_LOGIT, CausalLMLogits, CompositeLogits, combine_logits
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


def test_mixture_ensemble_by_hand():
    base = torch.zeros((1, 1, 2))
    flat = torch.zeros((1, 1, 2))  # p = [1/2, 1/2]
    sharp = torch.tensor([[[math.log(3.0), 0.0]]])  # p = [3/4, 1/4]
    # W = -2, shares 1/2: mixture p = [(1/2 + 3/4)/2, (1/2 + 1/4)/2] = [5/8, 3/8]; z = -2 · log p
    mixed = combine_logits(base, [flat, sharp], [-1.0, -1.0], ensemble="mixture")
    assert torch.allclose(mixed, torch.tensor([[[-2 * math.log(5 / 8), -2 * math.log(3 / 8)]]]))
    # The mean (default) subtracts each assistant's logits: [-ln 3, 0]
    assert torch.allclose(combine_logits(base, [flat, sharp], [-1.0, -1.0]), torch.tensor([[[-math.log(3.0), 0.0]]]))
    # Where it differs: 64 tokens, the base prefers token 0 by 3 nats; 3 of 4 assistants are flat, one puts
    # 0.97 on token 0 and 0.03/63 on each other token (logit ln(0.97·63/0.03) = ln 2037), each at w -0.25.
    wide_base = torch.zeros((1, 1, 64))
    wide_base[0, 0, 0] = 3.0
    wide_flat = torch.zeros((1, 1, 64))
    lone = torch.zeros((1, 1, 64))
    lone[0, 0, 0] = math.log(0.97 * 63 / 0.03)
    ensemble = [wide_flat, wide_flat, wide_flat, lone]
    # mean: z0 - z1 = 3 - 0.25 · ln 2037 = 1.0952 — the base's token still leads
    by_mean = combine_logits(wide_base, ensemble, [-0.25] * 4)
    assert (by_mean[0, 0, 0] - by_mean[0, 0, 1]).item() == pytest.approx(3 - 0.25 * math.log(2037), abs=1e-4)
    # mixture: p(0) = (3/64 + 0.97)/4, p(1) = (3/64 + 0.03/63)/4; z0 - z1 = 3 - ln(p(0)/p(1)) = -0.0669
    by_mixture = combine_logits(wide_base, ensemble, [-0.25] * 4, ensemble="mixture")
    ratio = (3 / 64 + 0.97) / (3 / 64 + 0.03 / 63)
    assert (by_mixture[0, 0, 0] - by_mixture[0, 0, 1]).item() == pytest.approx(3 - math.log(ratio), abs=1e-4)
    # One assistant: the mixture is the plain composite (equal probabilities).
    one = combine_logits(base, [sharp], [-0.7], ensemble="mixture")
    assert torch.allclose(torch.softmax(one, -1), torch.softmax(combine_logits(base, [sharp], [-0.7]), -1))
    with pytest.raises(ValueError, match="one sign"):
        combine_logits(base, [flat, sharp], [-1.0, 1.0], ensemble="mixture")
    with pytest.raises(ValueError, match="unknown ensemble"):
        combine_logits(base, [flat], [-1.0], ensemble="max")


def test_one_sided_subtraction_by_hand():
    base = torch.zeros((1, 1, 4))
    # The assistant's p = [0.7, 0.1, 0.1, 0.1]; uniform is 1/4, so only token 0 is above it, by ln(0.7·4) = ln 2.8.
    assistant = torch.log(torch.tensor([[[0.7, 0.1, 0.1, 0.1]]])) + 3.0  # any shift: logits, not log-probs
    one_sided = combine_logits(base, [assistant], [-2.0], subtractions=["one_sided"])
    # z = [-2 ln 2.8, 0, 0, 0]: the tokens it rejects keep the base's logits
    assert torch.allclose(one_sided, torch.tensor([[[-2 * math.log(2.8), 0.0, 0.0, 0.0]]]), atol=1e-6)
    # Linear: token 0 falls by 2·ln(0.7/0.1) = 2 ln 7 against the others, not 2 ln 2.8
    linear = combine_logits(base, [assistant], [-2.0])
    assert (linear[0, 0, 1] - linear[0, 0, 0]).item() == pytest.approx(2 * math.log(7.0), abs=1e-5)
    # Where they differ: p = [0.5, 0.49, 0.01] over 3 tokens. Linear raises the rejected token 2 above token 1
    # (by 2·ln 49 against the base's 1-nat lead); one-sided leaves 1 ahead of 2, so the base's ranking holds.
    three_base = torch.tensor([[[0.0, 1.0, 0.0]]])
    peaked = torch.log(torch.tensor([[[0.5, 0.49, 0.01]]]))
    linear3 = combine_logits(three_base, [peaked], [-2.0])
    assert linear3[0, 0].argmax().item() == 2
    one3 = combine_logits(three_base, [peaked], [-2.0], subtractions=["one_sided"])
    # tokens 0 and 1 are above uniform by ln 1.5 and ln 1.47: z = [-2 ln 1.5, 1 - 2 ln 1.47, 0]
    expected = torch.tensor([[[-2 * math.log(1.5), 1 - 2 * math.log(1.47), 0.0]]])
    assert torch.allclose(one3, expected, atol=1e-5)
    # A uniform assistant changes nothing, one-sided as linear
    assert torch.allclose(combine_logits(base, [torch.full((1, 1, 4), 5.0)], [-3.0], subtractions=["one_sided"]), base)
    # Per assistant: the second is subtracted one-sided, the first linearly
    mixed_modes = combine_logits(base, [assistant, assistant], [-1.0, -1.0], subtractions=["linear", "one_sided"])
    assert torch.allclose(mixed_modes, -1.0 * assistant - torch.tensor([[[math.log(2.8), 0.0, 0.0, 0.0]]]), atol=1e-6)
    # Mixture: W · max(log p_mix + ln V, 0); two equal assistants mix to the same p
    mixture = combine_logits(base, [assistant, assistant], [-1.0, -1.0], ensemble="mixture",
                             subtractions=["one_sided", "one_sided"])
    assert torch.allclose(mixture, torch.tensor([[[-2 * math.log(2.8), 0.0, 0.0, 0.0]]]), atol=1e-5)
    with pytest.raises(ValueError, match="one mode"):
        combine_logits(base, [assistant, assistant], [-1.0, -1.0], ensemble="mixture", subtractions=["linear", "one_sided"])
    with pytest.raises(ValueError, match="unknown subtraction"):
        combine_logits(base, [assistant], [-1.0], subtractions=["two_sided"])
    with pytest.raises(ValueError, match="one subtraction mode per assistant"):
        CompositeLogits(torch.nn.Identity(), [torch.nn.Identity()], [-1.0], subtractions=["linear", "linear"])


def test_one_sided_composite_on_a_trained_model(memorised):
    model, tokenizer, fmt = memorised
    prompts = [fmt.prompt(q) for q, _ in PAIRS]
    # The model as its own assistant: it is above uniform on what it memorised, so one-sided pushes that down
    # and changes answers, while at w 0 it is the base
    base_answers = greedy_generate(CausalLMLogits(model), tokenizer, prompts, 16)
    assert greedy_generate(CompositeLogits(model, [model], [0.0], subtractions=["one_sided"]), tokenizer, prompts, 16) == base_answers
    one_sided = greedy_generate(CompositeLogits(model, [model], [-2.0], subtractions=["one_sided"]), tokenizer, prompts, 16)
    assert one_sided != base_answers
    assert all(a.strip() != b.strip() for a, b in zip(one_sided, [a for _, a in PAIRS]))


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
