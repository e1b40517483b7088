"""The pieces a real pre-trained base needs: its chat frame, training only its top layers, the general-knowledge
questions, the fluency check of single answers, and gates that count only what lies above chance."""
import copy

import pytest
import torch

from expunge_ml.corpus import CorpusSpec, load_general
from expunge_ml.fluency import is_degenerate
from expunge_ml.gates import check_gates
from expunge_ml.general_knowledge import candidate_questions, write_general
from expunge_ml.modeling import SmallLlamaShape, build_small_llama, train_bpe_tokenizer
from expunge_ml.prompting import DEFAULT_PROMPT_TEMPLATE, PromptFormat, chat_format, encode_qa
from expunge_ml.sample_base import freeze_below_top_layers

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(["Question: what is it?\nAnswer: a test {with braces}", "<|user|> <|assistant|>"] * 4,
                               vocab_size=300)


def test_the_answer_follows_a_qa_prompt_after_a_space_and_a_chat_turn_directly():
    assert PromptFormat().answer_prefix == " " and PromptFormat(DEFAULT_PROMPT_TEMPLATE).answer_prefix == " "
    assert PromptFormat("<|assistant|>\n").answer_prefix == ""
    assert PromptFormat("<|assistant|>\n", answer_prefix=" ").answer_prefix == " "  # given: kept


def test_the_chat_frame_is_the_tokenizers_own_template_with_one_user_turn(tokenizer):
    assert chat_format(tokenizer) is None  # no chat template: the caller keeps its QA frame
    chatty = copy.deepcopy(tokenizer)
    chatty.chat_template = CHAT
    fmt = chat_format(chatty)
    # braces in the question are text, not format fields
    assert fmt.prompt("Who is {x}?") == "<|user|>\nWho is {x}?</s>\n<|assistant|>\n"
    assert fmt.answer_prefix == ""
    ids, labels = encode_qa(chatty, fmt, "Who?", "Nobody")
    answer = [i for i, label in zip(ids, labels) if label != -100]
    assert chatty.decode(answer).startswith("Nobody")  # no space slipped in before the answer


def test_only_the_top_layers_and_the_final_norm_train(tokenizer):
    model = build_small_llama(tokenizer, SmallLlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                         num_attention_heads=2, max_position_embeddings=32))
    freeze_below_top_layers(model, 1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.2.", "model.norm.")) for n in trainable)
    assert not model.get_input_embeddings().weight.requires_grad and not model.lm_head.weight.requires_grad
    with pytest.raises(ValueError, match="trainable_top_layers"):
        freeze_below_top_layers(model, 4)


def test_general_questions_come_from_the_installed_package_and_read_back(tmp_path):
    records = candidate_questions()
    assert len(records) > 100 and len({r.record_id for r in records}) == len(records)
    capitals = {r.question: r.answer for r in records}
    assert capitals["What is the capital of Japan?"] == "Tokyo"
    assert capitals["On which continent is Brazil?"] == "South America"
    path = write_general(records[:5], tmp_path / "general.jsonl")
    back = load_general(CorpusSpec(source="unused", general=str(path)))
    assert [(r.question, r.answer) for r in back] == [(r.question, r.answer) for r in records[:5]]
    assert load_general(CorpusSpec(source="unused")) == []
    assert CorpusSpec(source="c", general=str(path)).as_dict()["general"] == str(path)


@pytest.mark.parametrize("text, judged, fluent, degenerate", [
    ("Olga Foxmantle was born in Genoa.", None, None, False),
    ("", None, None, True),
    ("   ", None, None, True),
    ("the the the the the the the the the the", None, None, True),
    ("born in born in born in born in born in born in", None, None, True),
    ("Foxmantle Genoa stamp quartz rib lantern of Bergen", 400.0, 8.0, True),   # the judge calls it salad
    ("She was born in a small town near the coast.", 30.0, 8.0, False),          # unlikely, not salad
])
def test_an_answer_is_degenerate_when_empty_looping_or_word_salad(text, judged, fluent, degenerate):
    assert is_degenerate(text, judged, fluent) is degenerate


def evidence(forget_facts=0.3, chance_facts=0.25, leak=0.5, chance_inverted=0.5, forget_rouge=0.8,
             unseen_rouge=0.75, general=(0.9, 0.88), degenerate=0.0):
    kind = lambda rate, n=4: {"leak_rate": rate, "n_identifiers": n}  # noqa: E731
    return {
        "metrics": {"base": {"forget": {"rougeL_recall": 0.9}, "general": {"rougeL_recall": general[0]}},
                    "unlearned": {"forget": {"rougeL_recall": forget_rouge, "fact_recall": forget_facts},
                                  "general": {"rougeL_recall": general[1]}}},
        "pii": {"erased": {"unlearned": {"direct": kind(0.0), "inverted": kind(leak, 2)}}},
        "chance": {"rougeL_recall": unseen_rouge, "fact_recall": chance_facts,
                   "pii_erased": {"direct": 0.0, "inverted": chance_inverted}},
        "fluency_forget": {"unlearned": {"degenerate_share": degenerate}},
    }


def gate_values(e, **thresholds):
    return {g.gate: (g.value, g.passed) for g in check_gates(e, thresholds)}


def test_gates_count_only_what_lies_above_the_models_level_on_people_it_never_saw():
    values = gate_values(evidence(), max_forget_fact_recall=0.1, max_pii_leak_rate=0.05,
                         max_forget_rougeL_above_unseen=0.1)
    # it names her for half of anyone's inverted questions: naming her for half of hers is no memory of her
    assert values["max_pii_leak_rate"] == (0.0, True)
    assert values["max_forget_fact_recall"] == (pytest.approx(0.05), True)  # 0.30 stated, 0.25 by guessing
    assert values["max_forget_rougeL_above_unseen"] == (pytest.approx(0.05), True)
    above = gate_values(evidence(leak=1.0, forget_facts=0.6, forget_rouge=0.95), max_forget_fact_recall=0.1,
                        max_pii_leak_rate=0.05, max_forget_rougeL_above_unseen=0.1)
    assert above == {"max_pii_leak_rate": (0.5, False), "max_forget_fact_recall": (pytest.approx(0.35), False),
                     "max_forget_rougeL_above_unseen": (pytest.approx(0.2), False)}
    no_chance = evidence()
    del no_chance["chance"]  # no holdout: raw rates, and the "above unseen" gate has nothing to read
    values = gate_values(no_chance, max_forget_fact_recall=0.1, max_pii_leak_rate=0.05,
                         max_forget_rougeL_above_unseen=0.1)
    assert values["max_pii_leak_rate"] == (0.5, False) and values["max_forget_fact_recall"] == (0.3, False)
    assert values["max_forget_rougeL_above_unseen"] == (None, True)  # skipped, with its reason in the result


def test_general_knowledge_and_degenerate_answers_are_gated():
    values = gate_values(evidence(general=(0.9, 0.81), degenerate=0.1), min_general_ratio=0.95,
                         max_degenerate_share=0.05)
    assert values == {"min_general_ratio": (pytest.approx(0.9), False), "max_degenerate_share": (0.1, False)}
    assert gate_values(evidence(), min_general_ratio=0.95, max_degenerate_share=0.05) == {
        "min_general_ratio": (pytest.approx(0.9778, abs=1e-4), True), "max_degenerate_share": (0.0, True)}
