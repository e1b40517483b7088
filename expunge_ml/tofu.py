"""TOFU (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs") as QARecords and eval sets.

Pure data handling: reads the TOFU JSON files (never copies them), numbers the 4,000 QA of the full set
in TOFU's order (retain90 followed by forget10, 20 consecutive QA per fictitious author), and builds the
evaluation sets of the TOFU protocol:

- forget set of a split (forget01 / forget05 / forget10 = the last 2 / 10 / 20 authors), with
  paraphrased and 5 perturbed answers (truth ratio, forget quality);
- retain_perturbed (400 retain QA with paraphrased / perturbed answers) for the retain utility numbers;
- real_authors_perturbed and world_facts_perturbed (question, short correct answer, wrong options),
  stored as QARecords whose `paraphrased_answer` is the correct answer, because TOFU's truth ratio on
  these sets compares the wrong options with the correct answer itself.

Also the pure TOFU aggregate numbers that `metrics.py` does not have (normalised option probability).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .corpus import QARecord

QA_PER_AUTHOR = 20
N_AUTHORS = 200
FORGET_SPLITS = {"forget01": 2, "forget05": 10, "forget10": 20}  # split -> number of (last) authors


class TofuDataError(FileNotFoundError):
    """The TOFU files are missing or do not have the expected shape."""


def _read_json_or_lines(path: Path) -> list[dict]:
    if not path.exists():
        raise TofuDataError(f"missing TOFU file {path}")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return list(json.loads(text))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def author_of(index: int) -> int:
    """Author number (0..199) of a row of the full set (TOFU stores each author's 20 QA consecutively)."""
    return index // QA_PER_AUTHOR


def forget_authors(split: str) -> list[int]:
    """The authors a TOFU forget split removes: the last 2 / 10 / 20 of the 200 (nested)."""
    if split not in FORGET_SPLITS:
        raise ValueError(f"unknown TOFU split {split!r}; known: {', '.join(FORGET_SPLITS)}")
    n = FORGET_SPLITS[split]
    return list(range(N_AUTHORS - n, N_AUTHORS))


def _record(index: int, row: dict, extra: dict | None = None) -> QARecord:
    extra = extra or {}
    perturbed = extra.get("perturbed_answer", row.get("perturbed_answer", ())) or ()
    if isinstance(perturbed, str):
        perturbed = (perturbed,)
    return QARecord(
        record_id=f"tofu-{index:04d}",
        question=str(row["question"]),
        answer=str(row["answer"]),
        subject=f"author-{author_of(index):03d}",
        paraphrased_answer=str(extra.get("paraphrased_answer", row.get("paraphrased_answer", "")) or ""),
        perturbed_answers=tuple(str(p) for p in perturbed),
    )


@dataclass
class TofuData:
    """The full TOFU set (4,000 QARecords, index = position in retain90 + forget10) and its eval files."""

    full: list[QARecord]
    paraphrased_questions: dict[str, str]  # record_id -> paraphrased question (forget10 + retain_perturbed rows)
    retain_perturbed: list[QARecord]  # rows of the full set (record ids shared with `full`)
    real_authors: list[QARecord]  # paraphrased_answer = correct answer, perturbed_answers = wrong options
    world_facts: list[QARecord]
    idk_answers: list[str] = field(default_factory=list)

    def author_records(self, authors: Iterable[int]) -> list[QARecord]:
        wanted = set(authors)
        return [r for i, r in enumerate(self.full) if author_of(i) in wanted]

    def forget_records(self, split: str) -> list[QARecord]:
        return self.author_records(forget_authors(split))

    def retain_eval_records(self, authors: Iterable[int]) -> list[QARecord]:
        """retain_perturbed rows about the given authors (TOFU's retain utility set, restricted)."""
        wanted = {f"author-{a:03d}" for a in authors}
        return [r for r in self.retain_perturbed if r.subject in wanted]

    def retain_perturbed_authors(self) -> list[int]:
        """Authors covered by retain_perturbed, in order of first appearance."""
        seen: list[int] = []
        for r in self.retain_perturbed:
            a = int(r.subject.split("-")[1])
            if a not in seen:
                seen.append(a)
        return seen


def load_tofu(root: str | Path) -> TofuData:
    """Read the TOFU files under `root` (see ../shared/datasets/README.md for their layout)."""
    root = Path(root)
    retain90 = _read_json_or_lines(root / "retain90.json")
    forget10 = _read_json_or_lines(root / "forget10.json")
    if len(retain90) + len(forget10) != N_AUTHORS * QA_PER_AUTHOR:
        raise TofuDataError(
            f"expected retain90 + forget10 = {N_AUTHORS * QA_PER_AUTHOR} rows, got {len(retain90)} + {len(forget10)}"
        )
    rows = retain90 + forget10
    by_question: dict[str, int] = {}
    for i, row in enumerate(rows):
        by_question.setdefault(str(row["question"]), i)
    retain_perturbed_rows = _read_json_or_lines(root / "retain_perturbed.json")
    extras: dict[int, dict] = {}
    for row in retain_perturbed_rows:
        index = by_question.get(str(row["question"]))
        if index is not None:
            extras[index] = row
    full = [_record(i, row, extras.get(i)) for i, row in enumerate(rows)]
    paraphrased_questions = {
        full[len(retain90) + j].record_id: str(row.get("paraphrased_question", "") or "")
        for j, row in enumerate(forget10)
    }
    for index, row in extras.items():  # retain_perturbed rows have paraphrased questions too
        if row.get("paraphrased_question"):
            paraphrased_questions.setdefault(full[index].record_id, str(row["paraphrased_question"]))
    retain_perturbed = [full[i] for i in sorted(extras) if full[i].paraphrased_answer and full[i].perturbed_answers]

    def options(name: str) -> list[QARecord]:
        out = []
        for j, row in enumerate(_read_json_or_lines(root / name)):
            out.append(
                QARecord(
                    record_id=f"{name.split('_perturbed')[0]}-{j:03d}",
                    question=str(row["question"]),
                    answer=str(row["answer"]),
                    subject=name.split("_perturbed")[0],
                    paraphrased_answer=str(row["answer"]),
                    perturbed_answers=tuple(str(p) for p in row["perturbed_answer"]),
                )
            )
        return out

    idk_path = root / "idontknow.jsonl"
    idk = [line.strip() for line in idk_path.read_text(encoding="utf-8").splitlines() if line.strip()] if idk_path.exists() else []
    return TofuData(full, paraphrased_questions, retain_perturbed, options("real_authors_perturbed.json"),
                    options("world_facts_perturbed.json"), idk)


# ------------------------------------------------------------------ pure TOFU aggregates


def option_probability(correct_mean_log_prob: float, wrong_mean_log_probs: Sequence[float]) -> float:
    """TOFU's "probability" on real_authors / world_facts: P(correct) normalised over all options,
    each option's probability being its length-normalised (per-token geometric mean) probability."""
    logs = [float(correct_mean_log_prob)] + [float(x) for x in wrong_mean_log_probs]
    top = max(logs)
    weights = [math.exp(x - top) for x in logs]
    return weights[0] / sum(weights)


UTILITY_SETS = ("retain", "real_authors", "world_facts")
UTILITY_NUMBERS = ("prob", "rougeL", "truth_ratio")


def utility_keys() -> list[str]:
    """The 9 TOFU model-utility numbers, as `<set>_<number>` keys."""
    return [f"{s}_{n}" for s in UTILITY_SETS for n in UTILITY_NUMBERS]
