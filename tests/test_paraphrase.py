"""LM-written question wordings (expunge_ml/paraphrase.py): the filter on hand-made cases, and generation
with a tiny real Llama trained here to continue the few-shot prompt."""
from __future__ import annotations

import pytest
import torch

from expunge_ml.paraphrase import generate_question_paraphrases, keep_paraphrase, paraphrase_prompt

ORIGINAL = "What is the email address of Ann Lee?"


def test_keep_paraphrase_accepts_another_question_about_the_same_person():
    assert keep_paraphrase("Which email does Ann Lee use?", ORIGINAL, "Ann Lee")
    assert keep_paraphrase("which EMAIL does ann lee use?", ORIGINAL, "Ann Lee")  # case is no reason to drop it


def test_keep_paraphrase_rejects_what_a_small_model_gets_wrong():
    assert not keep_paraphrase("What is the email address of Ann Lee ?", ORIGINAL, "Ann Lee")  # the same words
    assert not keep_paraphrase("Which email does she use?", ORIGINAL, "Ann Lee")  # the person dropped
    assert not keep_paraphrase("Which email does Ann use?", ORIGINAL, "Ann Lee")  # only part of the name
    assert not keep_paraphrase("Ann Lee's email is ann@example.org.", ORIGINAL, "Ann Lee")  # an answer
    assert not keep_paraphrase("Ann Lee?", ORIGINAL, "Ann Lee")  # too short to be a question
    assert not keep_paraphrase("Which email does Rahul Mehta give Ann Lee?", ORIGINAL, "Ann Lee")  # a few-shot name
    assert not keep_paraphrase("Reworded: which email does Ann Lee use?", ORIGINAL, "Ann Lee")  # a prompt label


def test_the_prompt_ends_where_the_model_writes_the_rewording():
    prompt = paraphrase_prompt("  " + ORIGINAL + " ")
    assert prompt.endswith(f"Original: {ORIGINAL}\nReworded:")
    assert prompt.count("Original:") == 5  # four invented examples, then the question


@pytest.fixture(scope="module")
def lm_that_rewords():
    """A tiny Llama trained to continue the prompt for ORIGINAL with one good and one bad line."""
    from expunge_ml.modeling import SmallLlamaShape, build_small_llama, train_bpe_tokenizer

    prompt = paraphrase_prompt(ORIGINAL)
    targets = [" Which email does Ann Lee use?\n", " Which email does she use?\n"]
    tokenizer = train_bpe_tokenizer([prompt + t for t in targets], vocab_size=400)
    model = build_small_llama(tokenizer, SmallLlamaShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                         num_attention_heads=4, max_position_embeddings=512), seed=0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = [tokenizer(prompt + t + tokenizer.eos_token, return_tensors="pt")["input_ids"] for t in targets]
    model.train()
    for _ in range(60):
        for ids in batch:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
    return model.eval(), tokenizer


def test_generation_keeps_only_accepted_distinct_wordings_and_is_seeded(lm_that_rewords):
    model, tokenizer = lm_that_rewords
    tokenizer.padding_side = "right"
    items = [(ORIGINAL, "Ann Lee"), (ORIGINAL, "Bo Chan")]  # the second names someone the model never says
    first = generate_question_paraphrases(model, tokenizer, items, 2, candidates=6, batch_size=2, seed=1)
    assert first[0] == ["Which email does Ann Lee use?"]  # the name-less line it also learned is never kept
    assert first[1] == []  # nothing about Bo Chan: fewer than n, never a rejected line
    assert generate_question_paraphrases(model, tokenizer, items, 2, candidates=6, batch_size=2, seed=1) == first
    assert tokenizer.padding_side == "right"  # restored after left-padded generation
    assert generate_question_paraphrases(model, tokenizer, items, 0) == [[], []]


def test_the_benchmark_generates_wordings_once_and_trains_them_on_both_sides(lm_that_rewords, tmp_path):
    """benchmarks.pii: the wordings are cached per data set and paraphraser, and join forget⁺ (erased
    people) and retain⁺ (retained people) paired with the row's own answer."""
    import dataclasses

    from benchmarks.pii.data import PIIData
    from benchmarks.pii.methods import load_question_wordings, uld_training_data
    from benchmarks.pii.options import DEFAULT_ULD, PIIBenchOptions

    model, tokenizer = lm_that_rewords
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    ann = {"question": ORIGINAL, "answer": "It is ann@example.org.", "subject": "Ann Lee",
           "subject_pii": ["ann@example.org"]}
    bo = {"question": "What is the phone number of Bo Chan?", "answer": "It is 555-0100.", "subject": "Bo Chan",
          "subject_pii": ["555-0100"]}
    data = PIIData([ann], [bo], {}, ["Ann Lee", "Bo Chan"], "digest")
    uld = dataclasses.replace(DEFAULT_ULD, question_paraphrases=2, identifier_pairs=False, subject_pairs=False,
                              masked_answer_pairs=False, bare_identifiers=False, fact_span_loss=False,
                              augment_paraphrased=False)
    options = PIIBenchOptions(uld=uld, paraphraser=str(tmp_path / "lm"), cache_dir=tmp_path / "c")
