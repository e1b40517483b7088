"""UnlearnPII's rows: which people are trained, how they group, and what each erasure forgets and keeps."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .options import DEFAULT_DATA_DIR, REQUIRED_FILES, SPLIT_FILES, PIIBenchOptions, is_validation


def data_available(data_dir: Path = DEFAULT_DATA_DIR) -> bool:
    return all((Path(data_dir) / name).exists() for name in REQUIRED_FILES)


def _load(data_dir: Path, name: str) -> list[dict[str, Any]]:
    return json.loads((Path(data_dir) / name).read_text(encoding="utf-8"))


def _data_digest(data_dir: Path, names: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(set(names)):
        digest.update(name.encode())
        digest.update((Path(data_dir) / name).read_bytes())
    return digest.hexdigest()


@dataclass
class PIIData:
    forget10: list[dict[str, Any]]  # rows of the trained forget10 people
    retain_sample: list[dict[str, Any]]
    split_people: dict[str, list[str]]
    trained_people: list[str]
    digest: str
    # The splits whose people group the rows, smallest first: the requested splits, the default ones and
    # any split inside a requested one (see `group_rows`); `reported_groups` says which were requested.
    group_people: dict[str, list[str]] = field(default_factory=dict)

    @property
    def reported_groups(self) -> set[str]:
        """Groups whose people are all in a requested split (forget1's, when only forget5 is requested)."""
        requested = {p for people in self.split_people.values() for p in people}
        return {g for g, people in self.group_people.items() if set(people) <= requested}

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.forget10 + self.retain_sample


def load_data(options: PIIBenchOptions) -> PIIData:
    data_dir = Path(options.data_dir)
    missing = [n for n in REQUIRED_FILES if not (data_dir / n).exists()]
    if missing:
        raise FileNotFoundError(f"UnlearnPII files missing under {data_dir}: {missing}")
    names: list[str] = list(_load(data_dir, "forget10_names.json"))
    split_people: dict[str, list[str]] = {}
    for split in options.splits:
        if split not in SPLIT_FILES:
            raise ValueError(f"unknown split {split!r}; known: {sorted(SPLIT_FILES)}")
        split_people[split] = _split_people(data_dir, split)
    chosen = list(names[: options.n_people])
    for people in split_people.values():
        chosen += [p for p in people if p not in chosen]
    order = {p: i for i, p in enumerate(names)}
    chosen.sort(key=lambda p: order.get(p, len(order)))
    retain_sample = _load(data_dir, "test_retain_pii_sample.json")
    if options.retain_sample_rows is not None:
        retain_sample = retain_sample[: options.retain_sample_rows]
    kept = [r for r in _load(data_dir, "forget10.json") if r["subject"] in set(chosen)]
    trained = chosen + list(dict.fromkeys(r["subject"] for r in retain_sample))
    return PIIData(kept, retain_sample, split_people, trained, _data_digest(data_dir, REQUIRED_FILES),
                   _group_people(data_dir, split_people))


def _group_people(data_dir: Path, split_people: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """The requested splits, plus each default split and each split inside a requested one, smallest first."""
    requested = [set(people) for people in split_people.values()]
    group_people = dict(split_people)
    for split in SPLIT_FILES:
        if split not in group_people and (data_dir / SPLIT_FILES[split]).exists():
            people = _split_people(data_dir, split)
            if split in PIIBenchOptions.splits or any(set(people) <= r for r in requested):
                group_people[split] = people
    return dict(sorted(group_people.items(), key=lambda item: len(item[1])))


def _split_people(data_dir: Path, split: str) -> list[str]:
    return list(dict.fromkeys(r["subject"] for r in _load(data_dir, SPLIT_FILES[split])))


def group_rows(data: PIIData) -> dict[str, list[dict[str, Any]]]:
    """The trained rows in disjoint groups of people: each person in the smallest of `data.group_people`'s
    splits that holds them, else "other"; then "retain_sample". Disjoint, so each model generates every
    prompt once per split it serves. A split's forget and retain sets list their groups in turn, so a split
    run alone trains on the same order (seeded shuffles) as in the default run, and gives the same rows."""
    def group_of(subject: str) -> str:
        return next((split for split, people in data.group_people.items() if subject in people), "other")

    rows_by_group: dict[str, list[dict[str, Any]]] = {}
    for row in data.forget10:
        rows_by_group.setdefault(group_of(row["subject"]), []).append(row)
    rows_by_group["retain_sample"] = list(data.retain_sample)
    return rows_by_group


def paraphrased_pairs(row: Mapping[str, Any], n: int) -> list[tuple[str, str]]:
    out = []
    for i in range(1, n + 1):
        q, a = row.get(f"paraphrased_question_{i}"), row.get(f"paraphrased_answer_{i}")
        if q and a:
            out.append((str(q), str(a)))
    return out


def base_training_pairs(rows: Sequence[Mapping[str, Any]], options: PIIBenchOptions) -> list[tuple[str, str]]:
    """What the base memorises per row: the direct pair, `base_paraphrases` paraphrased pairs, the inverted pair.
    A model trained from scratch does not carry a fact across wordings, so without these forms its paraphrased
    and inverted leak rates would be ~0 before any unlearning."""
    pairs = []
    for row in rows:
        pairs.append((row["question"], row["answer"]))
        pairs += paraphrased_pairs(row, options.base_paraphrases)
        if options.base_inverted and row.get("inverted_question") and row.get("inverted_answer"):
            pairs.append((row["inverted_question"], row["inverted_answer"]))
    return pairs


def row_pii(row: Mapping[str, Any]) -> list[str]:
    """The row's identifiers (subject_pii) as non-blank strings: what an erasure request names."""
    return [str(p) for p in row.get("subject_pii") or () if str(p).strip()]


def qa_records(rows: Sequence[Mapping[str, Any]], prefix: str):
    """Direct QA rows as the pipeline's `QARecord`s: question, answer, subject, identifiers (subject_pii), the
    first paraphrased *answer* and the perturbed answers. The paraphrased and inverted *questions* are
    evaluation prompts and stay out."""
    from expunge_ml.corpus import QARecord

    return [
        QARecord(
            record_id=f"{prefix}-{i:04d}",
            question=str(r["question"]),
            answer=str(r["answer"]),
            subject=str(r.get("subject") or ""),
            paraphrased_answer=str(r.get("paraphrased_answer_1") or ""),
            perturbed_answers=tuple(str(r[k]) for k in (f"perturbed_answer_{j}" for j in range(1, 6)) if r.get(k)),
            pii=tuple(row_pii(r)),
        )
        for i, r in enumerate(rows)
    ]


def validation_erasures(rows_by_group: dict[str, list[dict]], split_people: dict[str, list[str]],
                        options: PIIBenchOptions) -> list[str]:
    """Carve the validation erasure(s) out of `rows_by_group` (in place); returns their split names."""
    n = options.validation_people
    if options.validation_source == "retain_sample":
        people = list(dict.fromkeys(r["subject"] for r in rows_by_group["retain_sample"]))
        if not 0 < n < len(people):
            raise ValueError(f"validation_people must be in 1..{len(people) - 1} (the retain sample has {len(people)} people)")
        chosen = set(people[:n])
        rows = rows_by_group.pop("retain_sample")
        rows_by_group["validation"] = [r for r in rows if r["subject"] in chosen]
        rows_by_group["retain_sample"] = [r for r in rows if r["subject"] not in chosen]
        split_people["validation"] = sorted(chosen)
        return ["validation"]
    if options.validation_source != "forget10":
        raise ValueError(f"validation_source must be retain_sample or forget10, not {options.validation_source!r}")
    rows = rows_by_group.pop("other", [])
    people = list(dict.fromkeys(r["subject"] for r in rows))
    count = min(2, len(people) // n) if n > 0 else 0
    if count < 1:
        raise ValueError(f"a forget10 validation erasure of {n} people needs ≥ {n} trained forget10 people outside "
                         f"the reported splits; {len(people)} are trained (raise n_people, up to 20)")
    names = []
    for i in range(count):
        chosen = set(people[i * n:(i + 1) * n])
        names.append(f"validation{i + 1}")
        rows_by_group[names[-1]] = [r for r in rows if r["subject"] in chosen]
        split_people[names[-1]] = sorted(chosen)
    erased = set(people[:count * n])
    rest = [r for r in rows if r["subject"] not in erased]
    if rest:
        rows_by_group["other"] = rest
    return names


def split_groups(split: str, rows_by_group: Mapping[str, Sequence[Mapping[str, Any]]], erased_people: set[str],
                 reported_groups: set[str]) -> tuple[list[str], list[str]]:
    """(erased, retained) groups of a split. A validation erasure's retained check leaves out the reported
    splits' people, so choosing settings never looks at them."""
    erased = [g for g, rows in rows_by_group.items() if g not in ("retain_sample", "other")
              and {r["subject"] for r in rows} <= erased_people]
    retained = [g for g in rows_by_group if g not in erased]
    if is_validation(split):
        retained = [g for g in retained if g not in reported_groups]
    return erased, retained


def retain_training_groups(split: str, erased: Sequence[str], retained: Sequence[str],
                           rows_by_group: Mapping[str, Sequence[Mapping[str, Any]]], reported_groups: set[str],
                           options: PIIBenchOptions) -> list[str]:
    """The groups whose rows the unlearning methods keep (retain set): the measured retained groups, plus,
    for a validation erasure with `validation_retain_reported`, the reported splits' people (kept in
    training, never measured)."""
    if not (is_validation(split) and options.validation_retain_reported):
        return list(retained)
    return list(retained) + [g for g in rows_by_group if g in reported_groups and g not in erased]
