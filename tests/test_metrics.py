"""Hand-computed checks for expunge_ml.metrics."""

import math
import warnings

import pytest
import torch

from expunge_ml import metrics as M

LN2, LN3 = math.log(2.0), math.log(3.0)


# --------------------------------------------------------------------------- ROUGE


def test_rouge_l_recall_and_f1():
    # LCS("the cat sat", "the cat sat on the mat") = 3; recall = 3/6, precision = 3/3
    assert M.rouge_l_recall("the cat sat", "the cat sat on the mat") == pytest.approx(0.5)
    # F1 = 2 * 0.5 * 1 / (0.5 + 1) = 2/3
    assert M.rouge_l_f1("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    # the argument order matters: recall is w.r.t. the reference (3/3 here)
    assert M.rouge_l_recall("the cat sat on the mat", "the cat sat") == pytest.approx(1.0)
    assert M.rouge_l_recall("dogs bark", "the cat sat") == 0.0


def test_rouge_uses_stemmer():
    # "cats" and "cat" stem to "cat"
    assert M.rouge_l_recall("the cats", "the cat") == pytest.approx(1.0)


# ------------------------------------------------------------------ log-probabilities


def _logits_1x2x3():
    # t0: [0, 0, 0]      -> log_softmax = [-ln3, -ln3, -ln3]
    # t1: [0, ln2, 0]    -> softmax [1/4, 1/2, 1/4] -> log p = [-2ln2, -ln2, -2ln2]
    return torch.tensor([[[0.0, 0.0, 0.0], [0.0, LN2, 0.0]]])


def test_sequence_log_probs_hand_values():
    s, n = M.sequence_log_probs(_logits_1x2x3(), torch.tensor([[0, 1]]))
    # -ln3 + -ln2 = -ln6
    assert s.shape == (1,) and n.shape == (1,)
    assert s.item() == pytest.approx(-math.log(6.0), abs=1e-6)
    assert n.tolist() == [2]
    # label 2 at t1 -> -2 ln2
    s, _ = M.sequence_log_probs(_logits_1x2x3(), torch.tensor([[0, 2]]))
    assert s.item() == pytest.approx(-LN3 - 2 * LN2, abs=1e-6)


def test_sequence_log_probs_ignore_index_and_batch():
    logits = torch.cat([_logits_1x2x3(), _logits_1x2x3()], dim=0)
    labels = torch.tensor([[-100, 1], [-100, -100]])
    s, n = M.sequence_log_probs(logits, labels)
    # row 0: only t1 counts -> -ln2, 1 token; row 1: nothing counts -> 0, 0 tokens
    assert s.tolist() == pytest.approx([-LN2, 0.0], abs=1e-6)
    assert n.tolist() == [1, 0]
    # custom ignore index
    s, n = M.sequence_log_probs(_logits_1x2x3(), torch.tensor([[0, 1]]), ignore_index=0)
    # label 0 is ignored -> only t1 counts: -ln2
    assert s.item() == pytest.approx(-LN2, abs=1e-6) and n.tolist() == [1]


def test_sequence_log_probs_float32_from_bf16():
    s, _ = M.sequence_log_probs(_logits_1x2x3().to(torch.bfloat16), torch.tensor([[0, 1]]))
    assert s.dtype == torch.float32
    assert s.item() == pytest.approx(-math.log(6.0), abs=1e-2)


def test_sequence_log_probs_shape_check():
    with pytest.raises(ValueError):
        M.sequence_log_probs(_logits_1x2x3(), torch.tensor([[0, 1, 2]]))


def test_shift_for_next_token():
    logits = torch.arange(3 * 4, dtype=torch.float32).reshape(1, 3, 4)
    labels = torch.tensor([[10, 11, 12]])
    sl, sy = M.shift_for_next_token(logits, labels)
    assert sl.shape == (1, 2, 4) and sy.tolist() == [[11, 12]]
    # logits at position 0 now predict the label at original position 1
    assert torch.equal(sl[:, 0], logits[:, 0])


def test_length_normalised_prob():
    # exp(-ln6 / 2) = 1/sqrt(6)
    assert M.length_normalised_prob(-math.log(6.0), 2) == pytest.approx(6 ** -0.5)
    assert math.isnan(M.length_normalised_prob(0.0, 0))
    out = M.length_normalised_prob(torch.tensor([-math.log(6.0), 0.0, -1.0]), torch.tensor([2, 0, 1]))
    assert out[0].item() == pytest.approx(6 ** -0.5)
    assert math.isnan(out[1].item())
    assert out[2].item() == pytest.approx(math.exp(-1.0))


# ------------------------------------------------------------------------ TOFU


def test_truth_ratio():
    # paraphrased mean log-prob -1 -> P^(1/len) = e^-1
    # perturbed -2, -4 -> geometric mean sqrt(e^-2 * e^-4) = e^-3
    # R = e^-3 / e^-1 = e^-2
    assert M.truth_ratio(-1.0, [-2.0, -4.0]) == pytest.approx(math.exp(-2.0))
    assert M.truth_ratio(-2.0, [-2.0]) == pytest.approx(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # beyond float range: inf, silently, and the scores take it
        assert M.truth_ratio(-800.0, [-1.0]) == math.inf
        assert M.forget_truth_ratio_score([math.inf, 1.0]) == pytest.approx(0.5)
        assert M.retain_truth_ratio_score([math.inf, 0.5]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        M.truth_ratio(-1.0, [])


def test_truth_ratio_scores():
    # min(R, 1/R): 0.5, 0.5, 1.0 -> mean 2/3
    assert M.forget_truth_ratio_score([0.5, 2.0, 1.0]) == pytest.approx(2 / 3)
    # max(0, 1-R): 0.75, 0, 0 -> mean 0.25
    assert M.retain_truth_ratio_score([0.25, 2.0, 1.0]) == pytest.approx(0.25)
    assert M.forget_truth_ratio_score([0.0]) == 0.0


def test_forget_quality():
    a = [0.1, 0.5, 0.9, 1.3]
    assert M.forget_quality(a, a) == pytest.approx(1.0)
    # disjoint samples of size 10: D = 1, exact two-sided p = 2 / C(20, 10) = 2 / 184756
    p = M.forget_quality(list(range(10)), list(range(10, 20)))
    assert p == pytest.approx(2 / math.comb(20, 10), rel=1e-6)
    assert p < 1e-4


def test_harmonic_mean_and_model_utility():
    # 2 / (1/1 + 1/0.5) = 2/3
    assert M.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert M.harmonic_mean([1.0, 0.0, 0.5]) == 0.0
    # 3 / (1 + 2 + 4) = 3/7
    assert M.model_utility({"a": 1.0, "b": 0.5, "c": 0.25}) == pytest.approx(3 / 7)
    with pytest.raises(ValueError):
        M.harmonic_mean([])
    with pytest.raises(ValueError):
        M.harmonic_mean([1.0, -0.5])


# ------------------------------------------------------------------ training-side


def test_kl_uniform_to_model_values():
    # uniform logits -> p = U -> KL = 0
    assert M.kl_uniform_to_model(torch.zeros(2, 3, 5), torch.ones(2, 3)).item() == pytest.approx(0.0, abs=1e-6)
    # logits [ln3, 0] -> p = [3/4, 1/4]
    # KL = -ln2 - (ln(3/4) + ln(1/4)) / 2 = -ln2 - ln(3/16)/2 = ln(4/3)/2 ~= 0.1438
    skew = torch.tensor([[[LN3, 0.0]]])
    assert M.kl_uniform_to_model(skew, torch.ones(1, 1)).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)


def test_kl_uniform_to_model_mask_and_gradient():
    # positions: uniform (KL 0), skewed (KL ln(4/3)/2), masked-out junk
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [5.0, -5.0]]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    kl = M.kl_uniform_to_model(logits, mask)
    assert kl.dim() == 0
    # mean over the 2 masked positions: (0 + ln(4/3)/2) / 2
    assert kl.item() == pytest.approx(0.25 * math.log(4 / 3), abs=1e-6)
    kl.backward()
    # d KL / d z = p - 1/V, scaled by 1/2 (two masked positions):
    # uniform -> [0, 0]; skewed -> ([3/4, 1/4] - 1/2) / 2 = [1/8, -1/8]; masked-out -> [0, 0]
    expected = torch.tensor([[[0.0, 0.0], [0.125, -0.125], [0.0, 0.0]]])
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_kl_uniform_to_model_empty_mask():
    assert M.kl_uniform_to_model(torch.randn(1, 2, 3), torch.zeros(1, 2)).item() == 0.0


# --------------------------------------------------------------------- text-side


def test_exact_and_normalised_leaks():
    text = "Call me on +44 7700-900 123 or write to Jane.Doe@example.com (office)."
    ids = ["+447700900123", "jane.doe@example.com", "Jane.Doe@example.com", "SW1A 1AA", "  "]
    # exact: only "Jane.Doe@example.com" -> 1
    # normalised: phone (spaces/dash stripped), both emails (casefold, dots stripped); postcode absent;
    # the blank identifier is skipped -> 3
    assert M.exact_and_normalised_leaks(text, ids) == (1, 3)
    assert M.exact_and_normalised_leaks("nothing here", ids) == (0, 0)


def test_fact_appears_matches_whole_words_and_unseparated_identifiers():
    assert M.fact_appears("She moved to Paris in 1990.", "paris")
    assert not M.fact_appears("A comparison of cities.", "Paris")  # not inside another word
    assert M.fact_appears("Call +447700900123 now", "+44 7700-900 123")  # digits: separators may go
    assert M.fact_appears("Call +44 7700900 123 now", "+447700900123")  # … either way round
    assert M.fact_appears("on 3 August", "3") and M.fact_appears("born 1958.", "1958")
    # … but the glued fact still starts and ends with words of the text: a day is not part of a longer number.
    assert not M.fact_appears("on 13 August", "3")
    assert not M.fact_appears("account 2056 2056", "205")
    assert not M.fact_appears("Call +447700900123 now", "7700 900")
    assert M.fact_appears("code 12 34 56", "3456") and not M.fact_appears("code 12 34 56", "2345")
    assert not M.fact_appears("Anna Maria", "Mariaanna")  # names are not glued together
    assert M.fact_appears("Dr. Maren Quillfeather treats her", "Maren Quillfeather")
    assert not M.fact_appears("Maren treats her", "Maren Quillfeather")  # the whole fact, not a part
    assert not M.fact_appears("anything", "—")  # no words: never found


def test_fact_recall_pools_over_records_by_hand():
    predictions = ["Jane lives in Oslo and was born in 1971.", "I don't know.", "No facts asked."]
    facts = [["Oslo", "1971", "Oslo"], ["Bergen", "IBAN NO93 8601 1117 947"], []]
    # record 1: 2 of 2 distinct facts; record 2: 0 of 2; record 3: none to find → 2 / 4
    assert M.fact_recall(predictions, facts) == (0.5, 4)
    assert M.fact_recall(["x"], [[]]) == (None, 0)
    assert M.facts_stated("Born in Lagos on 3 May", ["Lagos", "3 May 1990", "Lagos", "—"]) == (1, 2)
    with pytest.raises(ValueError):
        M.fact_recall(["a", "b"], [["x"]])
    # parentheses and dots in the identifier are stripped too
    assert M.exact_and_normalised_leaks("tel 0207 946 0000", ["(0207) 946.0000"]) == (0, 1)


def test_facts_stated_anywhere_pools_over_a_subjects_answers_by_hand():
    questions = ["What is Jane's hobby?", "Where does Jane work?", "Where does Jane live, Oslo or Bergen?"]
    answers = ["Jane Toys Oslo Toys", "I don't know.", "Oslo, I think."]
    facts = ["Thistledown Toys", "Oslo", "1971", "Oslo", "Jane", "—"]
    # "Oslo" is stated in answer 1, whose question does not name it (answer 3's question does: that one
    # reveals nothing); "Jane" only where the questions name her; "Thistledown Toys" only in part; "1971"
    # nowhere; "—" has no words. So 1 of 4 distinct facts.
    assert M.facts_stated_anywhere(answers, questions, facts) == (1, 4)
    # per record, answer 1 would be checked for its own record's facts only: the hobby, which it does not state
    assert M.facts_stated(answers[0], ["knitting"]) == (0, 1)
    assert M.facts_stated_anywhere([], [], ["Oslo"]) == (0, 1)
    with pytest.raises(ValueError):
        M.facts_stated_anywhere(["a"], [], ["x"])


def test_name_given_by_the_question_itself():
    email_question = "Whose email address is agnes.ulverde@postwren.example?"
    assert M.name_given_by(email_question, "Agnes Ulverde")            # words in order, side by side
    assert M.name_given_by(email_question, "A. Ulverde")               # an initial matches the word it begins
    assert M.name_given_by("Who uses aulverde@x.example?", "A. Ulverde")        # written together in one word
    assert M.name_given_by("Who uses agnes_ulverde@x.example?", "Agnes Ulverde")  # underscores split words
    assert M.name_given_by("Whose is ANN@x.example?", "Ann")                    # casefolded
    # Not given: only the surname, the words apart or reversed, another person's name, nothing to match.
    assert not M.name_given_by("Whose email address is ulverde@postwren.example?", "Agnes Ulverde")
    assert not M.name_given_by("Whose email address is ulverde@postwren.example?", "A. Ulverde")  # "address" is no initial of it
    assert not M.name_given_by("Whose email is ulverde.agnes@x.example?", "Agnes Ulverde")
    assert not M.name_given_by("Who answers the phone number +44 20 7946 0536?", "Agnes Ulverde")
    assert not M.name_given_by(email_question, "Agnes Ulverdes")
    assert not M.name_given_by(email_question, " . ")
    assert not M.name_given_by("Whose annual salary is 40,000?", "Ann")  # a one-word name is only ever a whole word
    assert not M.name_given_by("Tell me about it", "A. B.") and not M.name_given_by("x@ulverdeagnes.example", "Agnes Ulverde")
    assert M.name_given_by("Who uses agnesulverde1988@x.example?", "Agnes Ulverde")  # glued at the start of a word


def test_distinct_n():
    # bigrams: "a b", "b a", "a b" (text "c" has none) -> 2 unique / 3
    assert M.distinct_n(["a b a b", "c"], 2) == pytest.approx(2 / 3)
    # n-grams do not cross texts: "b c" is not formed -> unigrams a,b,c 3/3; bigrams none
    assert M.distinct_n(["a b", "c"], 1) == pytest.approx(1.0)
    assert M.distinct_n(["a a b"], 1) == pytest.approx(2 / 3)
    assert M.distinct_n([], 1) == 0.0
    assert M.distinct_n(["a"], 2) == 0.0


def test_repetition_rate():
    # trigrams: aba, bab, aba, bab -> 2 unique of 4 -> 1 - 2/4 = 0.5
    assert M.repetition_rate("a b a b a b") == pytest.approx(0.5)
    assert M.repetition_rate("a b c d") == 0.0
    assert M.repetition_rate("a b") == 0.0
    # unigrams: x x x x -> 1 unique of 4 -> 0.75
    assert M.repetition_rate("x x x x", n=1) == pytest.approx(0.75)


# ---------------------------------------------------------- membership inference


def test_min_k_percent_score():
    lps = [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0]
    # lowest 20% of 10 = 2 tokens: (-10 + -9) / 2
    assert M.min_k_percent_score(lps, 0.2) == pytest.approx(-9.5)
    # at least one token
    assert M.min_k_percent_score(lps, 0.01) == pytest.approx(-10.0)
    assert M.min_k_percent_score(lps, 1.0) == pytest.approx(-5.5)
    # 0.29 * 100 is 28.999999999999996 in floats; still 29 tokens: mean(-100..-72) = -86
    assert M.min_k_percent_score([-float(i) for i in range(1, 101)], 0.29) == pytest.approx(-86.0)
    with pytest.raises(ValueError):
        M.min_k_percent_score(lps, 0.0)
    with pytest.raises(ValueError):
        M.min_k_percent_score([], 0.2)


def test_roc_auc():
    assert M.roc_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert M.roc_auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert M.roc_auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5
    # pairs (m, n): (2,1) win, (2,2) tie 0.5, (3,1) win, (3,2) win -> 3.5 / 4
    assert M.roc_auc([2.0, 3.0], [1.0, 2.0]) == pytest.approx(0.875)
    with pytest.raises(ValueError):
        M.roc_auc([], [1.0])
