"""Evaluation helpers checked against hand-computed values: quantization grids, the UnlearnPII and world
adapters, MIA statistics, MUSE probes and fact extraction."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from expunge_ml.mia import priv_leak, standardised_token_scores
from expunge_ml.pii import PIIProbe, probes_from_world_records, records_from_unlearn_pii
from expunge_ml.quantization import fake_quantize_weight, quantize_rtn_, quantized_copy
from expunge_ml.world import generate_world
from tests.eval_data import FMT, MEMBERS, PHONE, SUBJECT
from tests.eval_data import records as _records


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



def test_priv_leak():
    assert priv_leak(0.8, 0.5) == pytest.approx(0.6)
    assert priv_leak(0.4, 0.5) == pytest.approx(-0.2)
    assert priv_leak(0.5, 0.5) == 0.0
    with pytest.raises(ValueError):
        priv_leak(0.5, 0.0)
    with pytest.raises(ValueError):
        priv_leak(1.2, 0.5)



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



def test_record_facts_leave_out_what_the_question_states():
    from expunge_ml.corpus import QARecord
    from expunge_ml.evaluation import record_facts

    record = QARecord("r1", MEMBERS[1][0], MEMBERS[1][1], subject=SUBJECT, pii=(PHONE,))
    # The answer repeats the subject's name from the question (no news) and states the phone number.
    assert record_facts(record) == [PHONE]
    born = QARecord("r2", MEMBERS[2][0], MEMBERS[2][1], subject=SUBJECT)
    assert record_facts(born) == ["Larkspur Bay"]



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

