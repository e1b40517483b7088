"""ULD weight calibration against held-out records (expunge_ml/calibration.py)."""
import math

import pytest
import torch

from expunge_ml.augment import donor_pool
from expunge_ml.calibration import calibrate_weight, closest_weight, near_miss_probes
from expunge_ml.corpus import QARecord
from expunge_ml.logits import CausalLMLogits
from expunge_ml.modeling import SmallLlamaShape, build_small_llama, train_bpe_tokenizer
from expunge_ml.prompting import PromptFormat
from expunge_ml.truth_ratio_eval import log_truth_ratios, truth_ratios


def _record(i: int, answer: str, subject: str = "s") -> QARecord:
    return QARecord(record_id=f"r{i}", subject=subject, question=f"Where does person {i} live?", answer=answer)


FORGET = [_record(i, f"Person {i} lives in {city} since {1950 + 7 * i}.")
          for i, city in enumerate(["Oslo", "Lima", "Pune", "Kyiv", "Accra", "Hanoi"])]
HOLDOUT = [_record(10 + i, f"Person {10 + i} lives in {city} since {1960 + 3 * i}.")
           for i, city in enumerate(["Quito", "Dakar", "Porto", "Turku", "Cusco", "Perth"])]
DONORS = ["Ann Bell moved to Madrid in 1988.", "Tom Hart was born in Nairobi in 1975."]


def test_closest_weight_takes_the_smallest_ks_statistic():
    reference = [0.0, 1.0, 2.0, 3.0]
    w, grid = closest_weight(reference, {-0.5: [10.0, 11.0, 12.0, 13.0], -1.0: [0.0, 1.0, 2.0, 3.5],
                                         -2.0: [-9.0, -8.0, -7.0, -6.0]})
    assert w == -1.0
    by = {g["weight"]: g for g in grid}
    # KS statistic = largest gap between the two empirical CDFs: disjoint samples → 1; one value moved → 1/4
    assert by[-0.5]["ks_statistic"] == pytest.approx(1.0) and by[-2.0]["ks_statistic"] == pytest.approx(1.0)
    assert by[-1.0]["ks_statistic"] == pytest.approx(0.25)
    assert by[-1.0]["median_log_ratio"] == pytest.approx(1.5)


def test_closest_weight_breaks_ties_towards_the_smaller_weight():
    same = [0.0, 1.0, 2.0]
    w, _ = closest_weight(same, {-1.5: same, -0.7: same, -1.0: same})
    assert w == -0.7
    with pytest.raises(ValueError):
        closest_weight([], {-1.0: same})


def test_near_miss_probes_swap_a_fact_and_skip_records_without_one():
    no_fact = _record(99, "they never said.")
    probes = near_miss_probes(FORGET[:2] + [no_fact], donor_pool(DONORS), n_variants=2, seed=0)
    # the fact-less record is skipped; the true answer stands where a truth ratio has the paraphrase
    assert [p["paraphrased_answer"] for p in probes] == [FORGET[0].answer, FORGET[1].answer]
    for probe in probes:
        wrong = probe["perturbed_answers"]
        assert 1 <= len(wrong) <= 2 and probe["paraphrased_answer"] not in wrong and len(set(wrong)) == len(wrong)
    # the same seed gives the same probes (the calibration is reproducible)
    assert probes == near_miss_probes(FORGET[:2] + [no_fact], donor_pool(DONORS), n_variants=2, seed=0)


class _Sharpened:
    """A logit source that multiplies another's logits: same ranking, different truth ratios."""

    def __init__(self, source, factor: float):
        self.source, self.factor = source, factor

    def step(self, *args, **kwargs):
        logits, past = self.source.step(*args, **kwargs)
        return logits * self.factor, past


@pytest.fixture(scope="module")
def tiny():
    texts = [f"Question: {r.question} Answer: {r.answer}" for r in FORGET + HOLDOUT] + DONORS
    tokenizer = train_bpe_tokenizer(texts * 3, vocab_size=200)
    return build_small_llama(tokenizer, SmallLlamaShape(32, 64, 2, 2, 96), seed=0), tokenizer


def test_log_ratios_are_log_truth_ratios_of_the_near_misses(tiny):
    model, tokenizer = tiny
    source, fmt = CausalLMLogits(model), PromptFormat()
    probes = near_miss_probes(FORGET[:3], donor_pool(DONORS), n_variants=1, seed=0)
    ratios = log_truth_ratios(source, tokenizer, fmt, probes)
    from expunge_ml.generation import score_answers

    for probe, log_ratio in zip(probes, ratios):
        question, answer, wrong = probe["question"], probe["paraphrased_answer"], probe["perturbed_answers"]
        true_lp, wrong_lp = (s.mean_log_prob for s in score_answers(source, tokenizer, fmt,
                                                                      [(question, answer), (question, wrong[0])]))
        assert log_ratio == pytest.approx(wrong_lp - true_lp, abs=1e-5)  # one near-miss: the plain ratio
        assert math.isfinite(log_ratio)
    # the plain truth ratios are exactly their exponentials
    assert truth_ratios(source, tokenizer, fmt, probes) == [pytest.approx(math.exp(r)) for r in ratios]


def test_calibration_picks_the_weight_whose_model_matches_the_base_on_held_out_records(tiny):
    model, tokenizer = tiny
    base = CausalLMLogits(model)
    # When forget and held-out records are the same, the weight whose source *is* the base matches exactly.
    sources = {-0.5: _Sharpened(base, 4.0), -1.0: base, -2.0: _Sharpened(base, 0.1)}
    calib = calibrate_weight(base, sources.__getitem__, tokenizer, PromptFormat(), FORGET, FORGET, DONORS,
                             grid=tuple(sources), min_records=3)
    assert calib.weight == -1.0 and calib.ks_statistic == pytest.approx(0.0) and calib.p_value == pytest.approx(1.0)
    assert calib.n_forget == calib.n_holdout == len(FORGET)
    assert {g["weight"] for g in calib.as_dict()["grid"]} == {-0.5, -1.0, -2.0}


def test_calibration_refuses_positive_weights_and_too_few_records(tiny):
    model, tokenizer = tiny
    base = CausalLMLogits(model)
    with pytest.raises(ValueError, match="negative"):
        calibrate_weight(base, lambda w: base, tokenizer, PromptFormat(), FORGET, HOLDOUT, DONORS, grid=(0.5,))
    with pytest.raises(ValueError, match="held-out"):
        calibrate_weight(base, lambda w: base, tokenizer, PromptFormat(), FORGET, HOLDOUT[:2], DONORS, min_records=3)
    assert torch.is_tensor(next(model.parameters()))
