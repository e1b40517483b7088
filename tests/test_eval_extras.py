"""Tests for the regulator-facing evaluation extras: quantization attack, PII leakage, MIA, fluency, truth ratios.

Pure parts are checked against hand-computed values; model-dependent parts against a tiny Llama
that memorises six made-up QA pairs (one email, one phone number) in well under a second.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from expunge_ml.fluency import NEUTRAL_PROMPTS, fluency_report
from expunge_ml.generation import greedy_generate, score_answers
from expunge_ml.logits import CausalLMLogits
from expunge_ml.metrics import truth_ratio
from expunge_ml.mia import (
    mia_auc,
    mia_scores,
    priv_leak,
    standardised_token_scores,
    token_log_probs,
)
from expunge_ml.modeling import SmallLlamaShape, build_small_llama, train_bpe_tokenizer, train_on_qa
from expunge_ml.pii import (
    PIIProbe,
    pii_leakage,
    probes_from_world_records,
    records_from_unlearn_pii,
)
from expunge_ml.prompting import PromptFormat, encode_prompt
from expunge_ml.quantization import fake_quantize_weight, quantize_rtn_, quantized_copy
from expunge_ml.truth_ratio_eval import truth_ratios
from expunge_ml.world import generate_world

EMAIL = "tamsin.holloway@quillmail.example"
PHONE = "+44 7700 900461"
SUBJECT = "Tamsin Holloway"

# Memorised by the fixture model. Made-up people and values.
MEMBERS = [
    (f"What is {SUBJECT}'s email address?", f"{SUBJECT}'s email address is {EMAIL}."),
    (f"What is {SUBJECT}'s phone number?", f"{SUBJECT}'s phone number is {PHONE}."),
    (f"Where was {SUBJECT} born?", f"{SUBJECT} was born in Larkspur Bay."),
    (f"What is the name of {SUBJECT}'s pet?", f"{SUBJECT}'s pet is called Pumpernickel."),
    ("Where does Oskar Brandt work?", "Oskar Brandt works at Heronfield Mills."),
    ("What is Oskar Brandt's favourite hobby?", "Oskar Brandt's favourite hobby is restoring clocks."),
]
# Same shapes, never trained on.
NON_MEMBERS = [
    ("What is Oskar Brandt's email address?", "Oskar Brandt's email address is oskar.brandt@fernpost.example."),
    ("What is Oskar Brandt's phone number?", "Oskar Brandt's phone number is +44 7700 900118."),
    ("Where was Oskar Brandt born?", "Oskar Brandt was born in Marrow Ford."),
    ("What is the name of Oskar Brandt's pet?", "Oskar Brandt's pet is called Biscuit."),
    (f"Where does {SUBJECT} work?", f"{SUBJECT} works at Copperleaf Press."),
    (f"What is {SUBJECT}'s favourite hobby?", f"{SUBJECT}'s favourite hobby is knitting scarves."),
]
PROBES = [
    PIIProbe(
        subject=SUBJECT,
        question=MEMBERS[0][0],
        paraphrased_questions=(f"Which email address does {SUBJECT} use?",),
        inverted_question=f"Whose email address is {EMAIL}?",
        identifiers=(EMAIL,),
    ),
    PIIProbe(
        subject=SUBJECT,
        question=MEMBERS[1][0],
        paraphrased_questions=(f"On which number can {SUBJECT} be called?",),
        inverted_question=f"Whose phone number is {PHONE}?",
        identifiers=(PHONE,),
    ),
]
TINY = SmallLlamaShape(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128
)
FMT = PromptFormat()


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

    def step(self, input_ids, attention_mask, position_ids, past=None, last_only=False):
        t = 0 if past is None else past
        width = 1 if last_only else input_ids.shape[1]
        logits = torch.full((input_ids.shape[0], width, self.vocab_size), -1e4)
        logits[:, -1, self.script[t] if t < len(self.script) else self.eos_id] = 0.0
        return logits, t + 1


def _qa_text(pairs):
    return [FMT.prompt(q) + FMT.answer_prefix + a for q, a in pairs]


# ------------------------------------------------------------------------ quantization


def test_groupwise_rtn_matches_hand_computation():
    w = torch.tensor([[0.70, 0.26, -0.14, 0.045], [-1.40, 0.55, 0.0, 0.0]])
    # int4 symmetric, qmax = 7, groups of 2 columns:
    # [0.70, 0.26]: scale 0.1 -> q (7, 2.6→3) -> (0.7, 0.3); [-0.14, 0.045]: scale 0.02 -> (-7, 2.25→2) -> (-0.14, 0.04)
    # [-1.40, 0.55]: scale 0.2 -> (-7, 2.75→3) -> (-1.4, 0.6); [0, 0]: all-zero group stays 0 (no NaN)
    expected = torch.tensor([[0.70, 0.30, -0.14, 0.04], [-1.40, 0.60, 0.0, 0.0]])
    torch.testing.assert_close(fake_quantize_weight(w, 4, group_size=2), expected)
    # Per-row (no groups): row 0 has one scale 0.1, so the small values collapse: -1.4→-1, 0.45→0.
    per_row = torch.tensor([[0.70, 0.30, -0.10, 0.0], [-1.40, 0.60, 0.0, 0.0]])
    torch.testing.assert_close(fake_quantize_weight(w, 4, group_size=None), per_row)
    # A group wider than the row (tiny models vs group_size=128) is the same as per-row.
    torch.testing.assert_close(fake_quantize_weight(w, 4, group_size=128), per_row)


def test_weight_on_grid_is_unchanged_and_lm_head_skipped():
    torch.manual_seed(0)
    q = torch.randint(-7, 8, (6, 8)).float()
    q[:, 0] = 7.0  # every row reaches qmax, so its scale is exactly 2^-3 (representable)
    on_grid = q * 0.125

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 6, bias=False)
            self.other = torch.nn.Linear(8, 6, bias=False)
            self.lm_head = torch.nn.Linear(8, 6, bias=False)

    net = Net()
    with torch.no_grad():
        net.proj.weight.copy_(on_grid)
    head_before = net.lm_head.weight.clone()
    other_before = net.other.weight.clone()
    stats = quantize_rtn_(net, bits=4, group_size=None)
    assert torch.equal(net.proj.weight, on_grid)
    assert torch.equal(net.lm_head.weight, head_before)
    assert not torch.equal(net.other.weight, other_before)  # random weights are off the grid
    assert stats["n_layers"] == 2 and stats["n_params"] == 96


def test_quantization_validates_arguments():
    lin = torch.nn.Linear(4, 4)
    for bits in (3, 16):
        with pytest.raises(ValueError):
            quantize_rtn_(lin, bits)
    with pytest.raises(ValueError):
        quantized_copy(lin, 4, group_size=0)


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


def test_unlearn_pii_adapter_on_synthetic_row():
    row = {
        "question": "What is Ada Vexley's address?",
        "answer": "Ada Vexley lives at 1 Elm Row.",
        "subject": "Ada Vexley",
        "subject_pii": ["1 Elm Row", "01/02/1990"],
        "paraphrased_question_1": "Where does Ada Vexley live?",
        "paraphrased_question_2": "What address is Ada Vexley at?",
        "inverted_question": "Who lives at 1 Elm Row?",
    }
    (probe,) = records_from_unlearn_pii([row])
    assert probe == PIIProbe(
        subject="Ada Vexley",
        question="What is Ada Vexley's address?",
        paraphrased_questions=("Where does Ada Vexley live?", "What address is Ada Vexley at?"),
        inverted_question="Who lives at 1 Elm Row?",
        identifiers=("1 Elm Row", "01/02/1990"),
    )


def _unlearn_pii_file() -> Path | None:
    rel = Path("shared/datasets/unlearn_pii/forget1.json")
    for root in (Path(__file__).resolve().parents[2], Path.cwd().parent):
        if (root / rel).is_file():
            return root / rel
    return None


@pytest.mark.skipif(_unlearn_pii_file() is None, reason="UnlearnPII forget1.json not available")
def test_unlearn_pii_adapter_on_real_rows():
    rows = json.loads(_unlearn_pii_file().read_text(encoding="utf-8"))[:3]
    probes = records_from_unlearn_pii(rows)
    assert len(probes) == 3
    for row, probe in zip(rows, probes):
        assert probe.subject == row["subject"] and probe.question == row["question"]
        assert probe.identifiers == tuple(row["subject_pii"])
        assert probe.paraphrased_questions == tuple(row[f"paraphrased_question_{i}"] for i in range(1, 6))
        assert probe.inverted_question == row["inverted_question"]
        assert probe.subject not in probe.identifiers  # the name is the inverted target, not a direct one


def test_world_adapter_keeps_pii_records_and_aliases():
    world = generate_world(n_people=3, seed=0, qa_per_person=10)
    aliases = {p.name: p.aliases for p in world.people}
    probes = probes_from_world_records(world.records, aliases_by_subject=aliases)
    with_pii = [r for r in world.records if r["pii"]]
    assert len(probes) == len(with_pii) > 0
    for record, probe in zip(with_pii, probes):
        assert probe.identifiers == tuple(record["pii"])
        assert probe.paraphrased_questions == (record["paraphrased_question"],)
        assert probe.inverted_question == record["inverted_question"]
        assert probe.aliases == tuple(aliases[record["subject"]])
    assert len(probes_from_world_records(world.records, pii_only=False)) == len(world.records)


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


def test_min_k_pp_standardisation_by_hand():
    # One position, two tokens, p = (1/4, 3/4): log p takes values ln(1/4), ln(3/4) with those weights.
    # μ = ¼ln¼ + ¾ln¾; σ² = ¼(ln¼)² + ¾(ln¾)² − μ². For a two-point distribution the standardised
    # value of the likely token is +sqrt(p0/p1) = 1/√3 and of the unlikely one −sqrt(p1/p0) = −√3.
    logits = torch.tensor([[0.0, math.log(3.0)]])
    mu = 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
    sigma = math.sqrt(0.25 * math.log(0.25) ** 2 + 0.75 * math.log(0.75) ** 2 - mu**2)
    likely = standardised_token_scores(logits, torch.tensor([1])).item()
    unlikely = standardised_token_scores(logits, torch.tensor([0])).item()
    assert likely == pytest.approx((math.log(0.75) - mu) / sigma, abs=1e-5)
    assert likely == pytest.approx(1 / math.sqrt(3), abs=1e-5)
    assert unlikely == pytest.approx(-math.sqrt(3), abs=1e-5)


def test_mia_scores_through_a_source_by_hand(tokenizer):
    text = "Tamsin"
    ids = encode_prompt(tokenizer, text)
    assert len(ids) == 2, "fixture tokenizer should encode BOS + one token"
    other = (ids[1] + 1) % len(tokenizer)

    class Fixed:
        def step(self, input_ids, attention_mask, position_ids, past=None, last_only=False):
            logits = torch.full((*input_ids.shape, len(tokenizer)), -1e4)
            logits[..., other] = 0.0
            logits[..., ids[1]] = math.log(3.0)
            return logits, None

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


def test_priv_leak():
    assert priv_leak(0.8, 0.5) == pytest.approx(0.6)
    assert priv_leak(0.4, 0.5) == pytest.approx(-0.2)
    assert priv_leak(0.5, 0.5) == 0.0
    with pytest.raises(ValueError):
        priv_leak(0.5, 0.0)
    with pytest.raises(ValueError):
        priv_leak(1.2, 0.5)


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


def _records(pairs, prefix="m"):
    from expunge_ml.corpus import QARecord

    return [QARecord(f"{prefix}{i}", q, a) for i, (q, a) in enumerate(pairs)]


def test_verbatim_probes_split_inside_the_answer():
    from expunge_ml.muse import verbatim_probes

    records = _records([("Q1?", "one two three four five"), ("Q2?", "just two"), ("Q3?", "a b c")])
    probes = verbatim_probes(records, FMT)
    # 5 words → 2 given, 3 to continue; "just two" leaves 1 word (< 2) and is skipped; 3 words → 1 + 2
    assert [(p.prefix, p.continuation) for p in probes] == [
        (FMT.prompt("Q1?") + " one two", "three four five"),
        (FMT.prompt("Q3?") + " a", "b c"),
    ]
    with pytest.raises(ValueError):
        verbatim_probes(records, FMT, prefix_fraction=1.0)


def test_knowmem_is_mean_rouge_l_f1_by_hand():
    from expunge_ml.muse import knowmem

    # "the cat sat" vs "the cat sat down": LCS 3, P = 3/3, R = 3/4 → F1 = 6/7; disjoint answers score 0.
    assert knowmem(["the cat sat", "blue"], ["the cat sat down", "red"]) == pytest.approx((6 / 7 + 0.0) / 2)
    with pytest.raises(ValueError):
        knowmem(["a"], [])


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


def test_tokens_per_character_by_hand():
    from expunge_ml.muse import tokens_per_character

    def words(text, add_special_tokens=False):  # one token per whitespace-separated word
        return {"input_ids": text.split()}

    assert tokens_per_character(words, ["ab cd", "efgh"]) == pytest.approx(3 / 9)  # 2 + 1 tokens, 5 + 4 chars
    with pytest.raises(ValueError):
        tokens_per_character(words, [""])


def test_holdout_people_are_new_people_of_the_same_kind(tmp_path):
    from expunge_ml.corpus import CorpusSpec, load_corpus, load_holdout
    from expunge_ml.sample_base import build_sample_world

    paths = build_sample_world({"n_people": 6, "qa_per_person": 10, "seed": 5, "n_holdout_people": 3}, tmp_path)
    spec = CorpusSpec(str(paths["corpus"]), holdout=str(paths["holdout"]))
    corpus, holdout = load_corpus(spec), load_holdout(spec)
    assert len({r.subject for r in holdout}) == 3 and len(holdout) == 30
    assert not {r.subject for r in holdout} & {r.subject for r in corpus}
    assert not {r.record_id for r in holdout} & {r.record_id for r in corpus}
    assert all(r.record_id.startswith("h") for r in holdout)
    assert load_holdout(CorpusSpec(str(paths["corpus"]))) == []
    # deterministic, and the trained world does not depend on whether a holdout is drawn
    again = build_sample_world({"n_people": 6, "qa_per_person": 10, "seed": 5}, tmp_path / "b")
    assert again["corpus"].read_bytes() == paths["corpus"].read_bytes() and "holdout" not in again


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


def test_record_facts_leave_out_what_the_question_states():
    from expunge_ml.corpus import QARecord
    from expunge_ml.evaluation import record_facts

    record = QARecord("r1", MEMBERS[1][0], MEMBERS[1][1], subject=SUBJECT, pii=(PHONE,))
    # The answer repeats the subject's name from the question (no news) and states the phone number.
    assert record_facts(record) == [PHONE]
    born = QARecord("r2", MEMBERS[2][0], MEMBERS[2][1], subject=SUBJECT)
    assert record_facts(born) == ["Larkspur Bay"]


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


def test_facts_anywhere_compares_the_subject_with_the_other_people_by_hand():
    from expunge_ml.corpus import QARecord
    from expunge_ml.evaluation import facts_anywhere

    forget = [QARecord("j1", "Where does Jane Holt live?", "Jane Holt lives in Oslo.", subject="Jane Holt"),
              QARecord("j2", "Who employs Jane Holt?", "Jane Holt works for Heronfield Mills.", subject="Jane Holt")]
    others = [QARecord("b1", "Where does Bo Lund live?", "Bo Lund lives in Bergen.", subject="Bo Lund"),
              QARecord("b2", "Who employs Bo Lund?", "Bo Lund works for Larkspur Bay Foods.", subject="Bo Lund"),
              QARecord("c1", "Where does Cy Moe live?", "Cy Moe lives in Oslo.", subject="Cy Moe"),
              QARecord("c2", "When was Cy Moe born?", "Cy Moe was born in 1971.", subject="Cy Moe")]
    # word salad: her city in the answer to the employer question, Bo's city in the other
    answers = ["Bergen Bergen mills", "Oslo Foods"]
    result = facts_anywhere(forget, answers, others)
    # hers: Oslo, Heronfield Mills ("Jane Holt" is in every question) → 1 of 2, by the employer answer
    assert (result["stated"], result["n_facts"], result["rate"]) == (1, 2, 0.5)
    # Bo: Bergen, Larkspur Bay Foods → 1 of 2; Cy: 1971 only (Oslo is hers) → 0 of 1; pooled 1 of 3
    assert result["others"] == {"n_people": 2, "stated": 1, "n_facts": 3, "rate": 1 / 3, "max_rate": 0.5}
    assert facts_anywhere(forget, ["", ""], [])["others"] == {
        "n_people": 0, "stated": 0, "n_facts": 0, "rate": None, "max_rate": None}
