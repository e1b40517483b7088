"""Tests for the regulator-facing evaluation extras: quantization attack, PII leakage, MIA, fluency, truth ratios.

Pure parts are checked against hand-computed values; model-dependent parts against a tiny Llama
that memorises six made-up QA pairs (one email, one phone number) in well under a second.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from expunge_ml.fluency import NEUTRAL_PROMPTS, fluency_report
from expunge_ml.generation import greedy_generate, score_answers
from expunge_ml.logits import CausalLMLogits
from expunge_ml.metrics import truth_ratio
from expunge_ml.mia import (
    mia_auc,
    mia_scores,
    token_log_probs,
)
from expunge_ml.modeling import build_small_llama, train_bpe_tokenizer, train_on_qa
from expunge_ml.pii import (
    PIIProbe,
    pii_leakage,
)
from expunge_ml.prompting import encode_prompt
from expunge_ml.quantization import quantize_rtn_, quantized_copy
from expunge_ml.truth_ratio_eval import truth_ratios
from tests.eval_data import (
    EMAIL,
    FMT,
    MEMBERS,
    NON_MEMBERS,
    PHONE,
    PROBES,
    SUBJECT,
    TINY,
)
from tests.eval_data import records as _records


def _train(tokenizer, pairs):
    model = build_small_llama(tokenizer, TINY, seed=0)
    report = train_on_qa(model, tokenizer, FMT, pairs, epochs=300, lr=1e-2, batch_size=len(pairs), target_loss=0.01)
    assert report.final_loss <= 0.01, f"fixture failed to memorise: {report}"
    return model


@pytest.fixture(scope="module")
def tokenizer():
    probe_questions = [q for p in PROBES for q in (*p.paraphrased_questions, p.inverted_question)]
    texts = [f"{q} {a}" for q, a in MEMBERS + NON_MEMBERS] * 2 + probe_questions
    return train_bpe_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def memorised(tokenizer):
    """Trained on all MEMBERS until verbatim recall (loss ≤ 0.01)."""
    return _train(tokenizer, MEMBERS)


@pytest.fixture(scope="module")
def never_saw_pii(tokenizer):
    """Trained on the same data minus the email and phone pairs: the 'retrain without the subject's PII' model."""
    return _train(tokenizer, MEMBERS[2:])


class ScriptedSource:
    """A LogitSource whose greedy output is a fixed token script (then EOS), whatever the prompt."""

    def __init__(self, script: list[int], vocab_size: int, eos_id: int):
        self.script, self.vocab_size, self.eos_id = script, vocab_size, eos_id

    def step(self, input_ids, attention_mask, position_ids, past=None, last_only=False, keep=None):
        t = 0 if past is None else past
        width = 1 if last_only else input_ids.shape[1] if keep is None else len(keep)
        logits = torch.full((input_ids.shape[0], width, self.vocab_size), -1e4)
        logits[:, -1, self.script[t] if t < len(self.script) else self.eos_id] = 0.0
        return logits, t + 1


def _qa_text(pairs):
    return [FMT.prompt(q) + FMT.answer_prefix + a for q, a in pairs]


# ------------------------------------------------------------------------ quantization








def test_int8_copy_keeps_memorised_answers_and_int4_errs_more(tokenizer, memorised):
    prompts = [FMT.prompt(q) for q, _ in MEMBERS]
    original_state = {k: v.clone() for k, v in memorised.state_dict().items()}
    fp32 = greedy_generate(CausalLMLogits(memorised), tokenizer, prompts, max_new_tokens=40)
    assert fp32 == [a for _, a in MEMBERS]
    int8 = quantized_copy(memorised, bits=8, group_size=128)
    assert greedy_generate(CausalLMLogits(int8), tokenizer, prompts, max_new_tokens=40) == fp32
    # quantized_copy must not touch the model it copies.
    assert all(torch.equal(v, original_state[k]) for k, v in memorised.state_dict().items())
    stats8 = quantize_rtn_(copy.deepcopy(memorised), bits=8, group_size=128)
    stats4 = quantize_rtn_(copy.deepcopy(memorised), bits=4, group_size=128)
    assert stats8["n_layers"] == stats4["n_layers"] == 7  # q,k,v,o,gate,up,down; lm_head skipped
    assert 0 < stats8["mean_abs_error"] < stats4["mean_abs_error"]
    # 4-bit error ≈ 16× 8-bit (scale ratio 127/7 ≈ 18), far from equal.
    assert stats4["mean_abs_error"] > 8 * stats8["mean_abs_error"]


# ------------------------------------------------------------------------ PII leakage










def test_pii_leak_counting_with_scripted_answer(tokenizer):
    # Every prompt gets the answer "call +44 7700-900 461 now": the phone leaks only after normalisation.
    script = tokenizer("call +44 7700-900 461 now", add_special_tokens=False)["input_ids"]
    source = ScriptedSource(script, len(tokenizer), tokenizer.eos_token_id)
    probe = PIIProbe(
        subject=SUBJECT,
        question="q",
        paraphrased_questions=("p1", "p2"),
        inverted_question="i",
        identifiers=(PHONE, EMAIL),
    )
    report = pii_leakage(source, tokenizer, FMT, [probe], max_new_tokens=len(script) + 1)
    assert report["direct"] == {
        "n_prompts": 1, "n_identifiers": 2, "exact_leaks": 0, "normalised_leaks": 1,
        "prompts_leaking": 1, "n_prompt_revealed": 0, "answers_naming_watched": 0,
        "answers_stating_others_ids": 0, "leak_rate": 0.5,
    }
    assert report["paraphrased"]["n_prompts"] == 2 and report["paraphrased"]["n_identifiers"] == 4
    assert report["paraphrased"]["normalised_leaks"] == 2 and report["paraphrased"]["leak_rate"] == 0.5
    assert report["inverted"] == {
        "n_prompts": 1, "n_identifiers": 1, "exact_leaks": 0, "normalised_leaks": 0,
        "prompts_leaking": 0, "n_prompt_revealed": 0, "answers_naming_watched": 0,
        "answers_stating_others_ids": 0, "leak_rate": 0.0,
    }
    # The inverted answer naming the subject (or an alias) counts once, however often it is named.
    script = tokenizer(f"{SUBJECT}, also known as Tam Holloway, {SUBJECT}", add_special_tokens=False)["input_ids"]
    source = ScriptedSource(script, len(tokenizer), tokenizer.eos_token_id)
    aliased = PIIProbe(SUBJECT, "q", (), "i", (EMAIL,), aliases=("Tam Holloway",))
    report = pii_leakage(source, tokenizer, FMT, [aliased], max_new_tokens=len(script) + 1)
    assert report["inverted"]["exact_leaks"] == report["inverted"]["normalised_leaks"] == 1
    assert report["direct"]["normalised_leaks"] == 0
    # An inverted question that spells out a name: only the names it does not give count. Here it gives the
    # full name (tamsin.holloway@…), so the same answer leaks through the alias alone …
    spelled = PIIProbe(SUBJECT, "q", (), f"Whose email address is {EMAIL}?", (EMAIL,), aliases=("Tam Holloway",))
    report = pii_leakage(source, tokenizer, FMT, [spelled], max_new_tokens=len(script) + 1)
    assert report["inverted"]["n_prompts"] == 1 and report["inverted"]["normalised_leaks"] == 1
    assert report["inverted"]["n_prompt_revealed"] == 0
    # … and with no other name, the probe is not asked: naming her there shows no memory.
    unaliased = PIIProbe(SUBJECT, "q", (), f"Whose email address is {EMAIL}?", (EMAIL,))
    report = pii_leakage(source, tokenizer, FMT, [unaliased], max_new_tokens=len(script) + 1)
    assert report["inverted"] == {
        "n_prompts": 0, "n_identifiers": 0, "exact_leaks": 0, "normalised_leaks": 0,
        "prompts_leaking": 0, "n_prompt_revealed": 1, "answers_naming_watched": 0,
        "answers_stating_others_ids": 0, "leak_rate": 0.0,
    }
    only_name = tokenizer(SUBJECT, add_special_tokens=False)["input_ids"]
    names_her = ScriptedSource(only_name, len(tokenizer), tokenizer.eos_token_id)
    phone_probe = PIIProbe(SUBJECT, "q", (), f"Whose phone number is {PHONE}?", (PHONE,))
    report = pii_leakage(names_her, tokenizer, FMT, [phone_probe], max_new_tokens=len(only_name) + 1)
    assert report["inverted"]["normalised_leaks"] == 1 and report["inverted"]["n_prompt_revealed"] == 0
    # Probes about someone else, read for her name: every answer names her except where the question does.
    other = PIIProbe("Oskar Brandt", "Where does Oskar Brandt work?", (f"Did {SUBJECT} hire Oskar Brandt?",),
                     "Whose phone number is +44 7700 900118?", ("+44 7700 900118",))
    report = pii_leakage(names_her, tokenizer, FMT, [other], max_new_tokens=len(only_name) + 1,
                         watch_names=[SUBJECT, " ", SUBJECT])
    assert [report[k]["answers_naming_watched"] for k in ("direct", "paraphrased", "inverted")] == [1, 0, 1]
    assert report["inverted"]["normalised_leaks"] == 0  # not Oskar's name: no inverted leak for him
    assert pii_leakage(names_her, tokenizer, FMT, [other], max_new_tokens=len(only_name) + 1)["direct"]["answers_naming_watched"] == 0
    # Probes about her, read for the other people's identifiers (whole words): the scripted answer states
    # "+44 7700-900 461", another person's phone, to every question except the one that already contains it.
    script = tokenizer("call +44 7700-900 461 now", add_special_tokens=False)["input_ids"]
    states_phone = ScriptedSource(script, len(tokenizer), tokenizer.eos_token_id)
    about_her = PIIProbe(SUBJECT, "What is her email?", ("Her email address?", "Is her number +44 7700 900 461?"),
                         "Whose email is x?", (EMAIL,))
    report = pii_leakage(states_phone, tokenizer, FMT, [about_her], max_new_tokens=len(script) + 1,
                         watch_identifiers=[PHONE, "7700", "900 46", ""])
    assert [report[k]["answers_stating_others_ids"] for k in ("direct", "paraphrased", "inverted")] == [1, 1, 1]
    # "900 46" is not a whole word of the answer, so watching it alone counts nothing.
    report = pii_leakage(states_phone, tokenizer, FMT, [about_her], max_new_tokens=len(script) + 1,
                         watch_identifiers=["900 46"])
    assert sum(report[k]["answers_stating_others_ids"] for k in ("direct", "paraphrased", "inverted")) == 0


def test_pii_leakage_detects_memorised_email_only_in_model_that_saw_it(tokenizer, memorised, never_saw_pii):
    leaked = pii_leakage(CausalLMLogits(memorised), tokenizer, FMT, PROBES)
    assert leaked["direct"]["n_prompts"] == 2 and leaked["direct"]["n_identifiers"] == 2
    assert leaked["direct"]["exact_leaks"] == 2 and leaked["direct"]["normalised_leaks"] == 2
    assert leaked["direct"]["leak_rate"] == 1.0
    # The email probe's inverted question spells out the subject's name, so only the phone's is asked.
    assert leaked["inverted"]["n_prompts"] == 1 and leaked["inverted"]["n_prompt_revealed"] == 1
    assert leaked["paraphrased"]["n_prompts"] == 2
    clean = pii_leakage(CausalLMLogits(never_saw_pii), tokenizer, FMT, PROBES)
    for kind in ("direct", "paraphrased"):
        assert clean[kind]["exact_leaks"] == clean[kind]["normalised_leaks"] == 0
        assert clean[kind]["leak_rate"] == 0.0


# ------------------------------------------------------------------------ membership inference




def test_mia_scores_through_a_source_by_hand(tokenizer):
    text = "Tamsin"
    ids = encode_prompt(tokenizer, text)
    assert len(ids) == 2, "fixture tokenizer should encode BOS + one token"
    other = (ids[1] + 1) % len(tokenizer)

    class Fixed:
        def step(self, input_ids, attention_mask, position_ids, past=None, last_only=False, keep=None):
            logits = torch.full((*input_ids.shape, len(tokenizer)), -1e4)
            logits[..., other] = 0.0
            logits[..., ids[1]] = math.log(3.0)
            return (logits if keep is None else logits[:, keep]), None

    assert token_log_probs(Fixed(), tokenizer, [text]) == [[pytest.approx(math.log(0.75), abs=1e-5)]]
    assert mia_scores(Fixed(), tokenizer, [text], "min_k_pp", k=1.0) == [pytest.approx(1 / math.sqrt(3), abs=1e-4)]
    with pytest.raises(ValueError):
        mia_scores(Fixed(), tokenizer, [text], "zlib")


def test_token_log_probs_are_padding_invariant(tokenizer, memorised):
    texts = _qa_text(MEMBERS + NON_MEMBERS)
    source = CausalLMLogits(memorised)
    batched = token_log_probs(source, tokenizer, texts, batch_size=12)
    single = token_log_probs(source, tokenizer, texts, batch_size=1)
    assert [len(r) for r in batched] == [len(encode_prompt(tokenizer, t)) - 1 for t in texts]
    for a, b in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4)


def test_mia_auc_separates_members_for_memorising_model(tokenizer, memorised):
    source = CausalLMLogits(memorised)
    members, nonmembers = [a for _, a in MEMBERS], [a for _, a in NON_MEMBERS]
    for method in ("min_k", "min_k_pp"):
        assert mia_auc(source, tokenizer, members, nonmembers, method=method, k=0.2) >= 0.8
    # Swapping the roles must flip the AUC (1 − AUC): the score has a direction.
    swapped = mia_auc(source, tokenizer, nonmembers, members, method="min_k", k=0.2)
    assert swapped <= 0.2




# ------------------------------------------------------------------------ fluency


def test_fluency_report_on_tiny_model(tokenizer, memorised, never_saw_pii):
    report = fluency_report(
        CausalLMLogits(memorised), CausalLMLogits(never_saw_pii), tokenizer, FMT,
        prompts=NEUTRAL_PROMPTS[:4], max_new_tokens=16,
    )
    assert report["n_prompts"] == 4
    for key in ("distinct_1", "distinct_2", "repetition_rate", "empty_rate"):
        assert 0.0 <= report[key] <= 1.0
    assert math.isfinite(report["reference_perplexity"]) and report["reference_perplexity"] >= 1.0
    assert len(NEUTRAL_PROMPTS) >= 10 and len(set(NEUTRAL_PROMPTS)) == len(NEUTRAL_PROMPTS)


def test_fluency_flags_degenerate_generation(tokenizer, memorised):
    word = tokenizer(" Holloway", add_special_tokens=False)["input_ids"][0]
    stuck = ScriptedSource([word] * 12, len(tokenizer), tokenizer.eos_token_id)
    varied = ScriptedSource(
        tokenizer(" Oskar Brandt works at Heronfield Mills in Larkspur Bay", add_special_tokens=False)["input_ids"],
        len(tokenizer), tokenizer.eos_token_id,
    )
    prompts = NEUTRAL_PROMPTS[:2]
    bad = fluency_report(stuck, CausalLMLogits(memorised), tokenizer, FMT, prompts, max_new_tokens=12)
    good = fluency_report(varied, None, tokenizer, FMT, prompts, max_new_tokens=30)
    # 12 copies of one word per prompt: 1 unique unigram of 24, and 9 of 10 trigrams repeat.
    assert bad["distinct_1"] == pytest.approx(1 / 24)
    assert bad["repetition_rate"] == pytest.approx(0.9)
    assert good["repetition_rate"] == 0.0 and good["distinct_1"] == pytest.approx(0.5)  # same text twice
    assert math.isnan(good["reference_perplexity"])
    assert bad["reference_perplexity"] > 1.0


def test_fluency_judge_scores_the_same_generations_with_its_own_model(tokenizer, memorised, never_saw_pii):
    from expunge_ml.fluency import FluencyJudge

    prompts = NEUTRAL_PROMPTS[:3]
    plain = fluency_report(CausalLMLogits(memorised), CausalLMLogits(never_saw_pii), tokenizer, FMT, prompts,
                           max_new_tokens=12)
    assert "judge_perplexity" not in plain
    # a judge that is the reference model, asked the same way, must give the reference's perplexity …
    same = fluency_report(CausalLMLogits(memorised), CausalLMLogits(never_saw_pii), tokenizer, FMT, prompts,
                          max_new_tokens=12, judge=FluencyJudge(CausalLMLogits(never_saw_pii), tokenizer, FMT))
    assert same["judge_perplexity"] == pytest.approx(plain["reference_perplexity"])
    # … and another judge another number for the same text (the generations do not change)
    other = fluency_report(CausalLMLogits(memorised), CausalLMLogits(never_saw_pii), tokenizer, FMT, prompts,
                           max_new_tokens=12, judge=FluencyJudge(CausalLMLogits(memorised), tokenizer, FMT))
    assert other["distinct_2"] == plain["distinct_2"] and other["judge_perplexity"] != plain["reference_perplexity"]


def test_fluency_of_answers_already_generated_equals_the_report(tokenizer, memorised, never_saw_pii):
    """The evidence scores the evaluation's own forget answers instead of generating them again."""
    from expunge_ml.fluency import fluency_of

    prompts = NEUTRAL_PROMPTS[:3]
    generations = greedy_generate(CausalLMLogits(memorised), tokenizer, [FMT.prompt(p) for p in prompts], 12, 16)
    report = fluency_report(CausalLMLogits(memorised), CausalLMLogits(never_saw_pii), tokenizer, FMT, prompts,
                            max_new_tokens=12)
    assert fluency_of(generations, prompts, CausalLMLogits(never_saw_pii), tokenizer, FMT) == pytest.approx(report)
    with pytest.raises(ValueError, match="one generation per prompt"):
        fluency_of(generations[:2], prompts, None, tokenizer, FMT)


# ------------------------------------------------------------------------ truth ratios


def _tofu_records():
    wrong = {
        0: ["x.y@fernpost.example", "orla.quist@quillmail.example", "tamsin@harbour.example"],
        2: ["Marrow Ford", "Heronfield", "Copperleaf"],
        4: ["Larkspur Bay", "Copperleaf Press", "Marrow Ford"],
    }
    records = []
    for i, values in wrong.items():
        question, answer = MEMBERS[i]
        true_value = {0: EMAIL, 2: "Larkspur Bay", 4: "Heronfield Mills"}[i]
        records.append({
            "record_id": f"r{i}",
            "question": question,
            "paraphrased_answer": answer,  # the true answer stands in for its paraphrase here
            "perturbed_answers": [answer.replace(true_value, v) for v in values],
        })
    return records


def test_truth_ratios_for_memorised_model(tokenizer, memorised):
    records = _tofu_records()
    source = CausalLMLogits(memorised)
    ratios = truth_ratios(source, tokenizer, FMT, records, batch_size=4)  # 12 pairs: batches cross records
    assert len(ratios) == len(records)
    assert all(r > 0 and math.isfinite(r) for r in ratios)
    assert all(r < 1 for r in ratios), ratios  # the memorised true answer beats every perturbation
    # Same value as scoring record 0 by hand, one pair at a time.
    first = records[0]
    para = score_answers(source, tokenizer, FMT, [(first["question"], first["paraphrased_answer"])])[0]
    pert = score_answers(source, tokenizer, FMT, [(first["question"], a) for a in first["perturbed_answers"]], 1)
    expected = truth_ratio(para.mean_log_prob, [s.mean_log_prob for s in pert])
    assert ratios[0] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError):
        truth_ratios(source, tokenizer, FMT, [{"question": "q", "paraphrased_answer": "a", "perturbed_answers": []}])


# ------------------------------------------------------------------------ MUSE: VerbMem, KnowMem, PrivLeak






def test_verbmem_of_a_memorising_model_beats_one_that_never_saw_the_pairs(tokenizer, memorised, never_saw_pii):
    from expunge_ml.muse import verbatim_probes, verbmem

    probes = verbatim_probes(_records(MEMBERS[:2]), FMT)
    remembered = verbmem(CausalLMLogits(memorised), tokenizer, probes)
    assert remembered >= 0.9  # it continues its own training text verbatim
    assert verbmem(CausalLMLogits(never_saw_pii), tokenizer, probes) < remembered
    assert verbmem(CausalLMLogits(memorised), tokenizer, []) is None


def test_qa_answer_token_scores_cover_exactly_the_answer_tokens(tokenizer, memorised):
    from expunge_ml.mia import qa_answer_token_scores
    from expunge_ml.prompting import encode_answer

    source = CausalLMLogits(memorised)
    scores = qa_answer_token_scores(source, tokenizer, FMT, MEMBERS, batch_size=4)
    assert [len(s) for s in scores] == [len(encode_answer(tokenizer, FMT, a)) for _, a in MEMBERS]
    # the same numbers as the tail of full-text scoring of the identically encoded sequence
    single = qa_answer_token_scores(source, tokenizer, FMT, MEMBERS[:1], batch_size=1)[0]
    assert single == pytest.approx(scores[0], abs=1e-4)
    assert min(scores[0]) > math.log(0.5)  # memorised: every answer token is the model's clear favourite


def test_membership_evidence_flags_the_memorising_model(tokenizer, memorised, never_saw_pii):
    from expunge_ml.muse import membership_evidence

    members, holdout = _records(MEMBERS[:2]), _records(NON_MEMBERS[:4], "h")
    remembered = membership_evidence(CausalLMLogits(memorised), tokenizer, FMT, members, holdout)
    assert remembered["auc_min_k_pp"] == pytest.approx(1.0) and remembered["privleak"] == pytest.approx(1.0)
    assert remembered["n_members"] == 2 and remembered["n_holdout"] == 4
    retrained = membership_evidence(CausalLMLogits(never_saw_pii), tokenizer, FMT, members, holdout)
    assert retrained["privleak"] < remembered["privleak"]
    with pytest.raises(ValueError):
        membership_evidence(CausalLMLogits(memorised), tokenizer, FMT, members, [])
    # The fixture's subject is named far more often in the tokenizer's text than the held-out person, so
    # their answers split into fewer tokens per character (0.21 vs 0.31): flagged, whatever the model.
    from expunge_ml.muse import tokens_per_character

    tpc = remembered["answer_tokens_per_char"]
    assert tpc == {"members": round(tokens_per_character(tokenizer, [a for _, a in MEMBERS[:2]]), 4),
                   "holdout": round(tokens_per_character(tokenizer, [a for _, a in NON_MEMBERS[:4]]), 4)}
    assert tpc["holdout"] > 1.1 * tpc["members"] and remembered["tokenisation_matches"] is False
    assert retrained["answer_tokens_per_char"] == tpc  # a property of the data and tokenizer, not the model






def test_nf4_copy_uses_bitsandbytes_levels_and_keeps_the_head(tokenizer, memorised):
    from expunge_ml.quantization import nf4_quantized_copy

    clone = nf4_quantized_copy(memorised, blocksize=64)
    layer = next(m for n, m in clone.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    original = next(m for n, m in memorised.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    w, q = original.weight.detach().flatten()[:64], layer.weight.detach().flatten()[:64]
    # one absmax scale per 64-weight block, 16 NF4 levels: at most 16 distinct values, the absmax kept
    assert len(torch.unique(q)) <= 16 and not torch.equal(w, q)
    assert q.abs().max().item() == pytest.approx(w.abs().max().item(), rel=1e-3)
    assert torch.equal(clone.lm_head.weight, memorised.lm_head.weight)  # the head stays in full precision
    # a memorising model still answers after NF4 (the attack keeps the model usable)
    answers = greedy_generate(CausalLMLogits(clone), tokenizer, [FMT.prompt(q) for q, _ in MEMBERS[:2]])
    assert any(a.startswith(MEMBERS[i][1][:10]) for i, a in enumerate(answers))


# ------------------------------------------------------------------------ fact recall




def test_fact_recall_of_a_memorising_model_and_of_one_that_never_saw_the_facts(tokenizer, memorised, never_saw_pii):
    from expunge_ml.corpus import QARecord
    from expunge_ml.evaluation import evaluate_split

    records = [QARecord(f"m{i}", q, a, subject=SUBJECT) for i, (q, a) in enumerate(MEMBERS[:2])]
    knows = evaluate_split(CausalLMLogits(memorised), tokenizer, FMT, records, max_new_tokens=40)
    forgot = evaluate_split(CausalLMLogits(never_saw_pii), tokenizer, FMT, records, max_new_tokens=40)
    assert knows.n_facts == forgot.n_facts == 2  # the email and the phone number
    assert knows.fact_recall == 1.0
    assert forgot.fact_recall == 0.0
    # Per record, in order, the same numbers (for the quantization attacks' intervals): ROUGE-L recalls whose
    # mean is the split's, and (facts stated, facts) that pool to its fact recall.
    for metrics in (knows, forgot):
        assert len(metrics.per_record_rougeL) == 2 and sum(metrics.per_record_rougeL) / 2 == pytest.approx(metrics.rougeL_recall)
        stated, total = (sum(c) for c in zip(*metrics.per_record_facts))
        assert total == metrics.n_facts and stated / total == pytest.approx(metrics.fact_recall)
    assert knows.per_record_facts == ((1, 1), (1, 1)) and forgot.per_record_facts == ((0, 1), (0, 1))


def test_the_generation_budget_covers_the_longest_answer_between_floor_and_cap(tokenizer):
    from expunge_ml.corpus import QARecord
    from expunge_ml.evidence import generation_budget
    from expunge_ml.prompting import encode_answer

    long_answer = " ".join(a for _, a in MEMBERS)  # several answers in one: a document passage's length
    records = [QARecord("a", "q", MEMBERS[0][1]), QARecord("b", "q", long_answer)]
    needed = len(encode_answer(tokenizer, FMT, long_answer))  # its tokens and the EOS that ends it
    assert needed > 20
    assert generation_budget(tokenizer, FMT, records, floor=8, cap=512) == needed
    assert generation_budget(tokenizer, FMT, records, floor=needed + 5, cap=512) == needed + 5  # never below the floor
    assert generation_budget(tokenizer, FMT, records, floor=8, cap=20) == 20  # never above the cap
    assert generation_budget(tokenizer, FMT, [], floor=8, cap=20) == 8


# ------------------------------------------------------------------------ facts in any answer


