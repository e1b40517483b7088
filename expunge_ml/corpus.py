"""Training corpora and the forget/retain split.

A corpus is any `datasets`-loadable source (local JSON/JSONL/CSV/Parquet, a dataset directory, or a hub
dataset id at a site with network) of QA pairs or of documents. Column names are mapped, not assumed.
A document corpus (a `text` column) is cut into passages, each one record whose "question" is the
passage's opening words and whose "answer" is the rest, read with a raw prompt (the opening words as
written): so erasing, training and every metric work on documents as on QA pairs, and a greedy answer is
a verbatim continuation.
Resolving a request's subject to records is exact/alias matching (Aho–Corasick over casefolded text,
on word boundaries); neighbours for the retain set are ranked by fuzzy similarity (rapidfuzz) to the
forget answers, so the assistant learns to *not* remember the people and facts closest to the subject.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

ALL_COLUMNS = (
    "record_id", "question", "answer", "subject", "document_id", "paraphrased_answer",
    "perturbed_answers", "paraphrased_question", "inverted_question", "pii", "text",
)
CORPUS_KINDS = ("auto", "qa", "documents")
# A passage of a document corpus is prompted with its own opening words, nothing around them: a model
# trained on raw documents has never seen a "Question: … Answer:" frame.
DOCUMENT_PROMPT_TEMPLATE = "{question}"


@dataclass(frozen=True)
class QARecord:
    record_id: str
    question: str
    answer: str
    subject: str = ""
    document_id: str = ""
    paraphrased_answer: str = ""
    perturbed_answers: tuple[str, ...] = ()
    # Optional probes for evaluation (never trained on): other wordings, and "whose X is this?".
    paraphrased_question: str = ""
    inverted_question: str = ""
    pii: tuple[str, ...] = ()  # identifier strings this answer reveals
    # A document passage's place in its document (`document_passages`); -1 for a QA record. Subject matching
    # uses it to find a name cut in two by the boundary between passage n and n + 1.
    passage_index: int = -1

    @property
    def pair(self) -> tuple[str, str]:
        return (self.question, self.answer)


@dataclass(frozen=True)
class CorpusSpec:
    """Where a model's training corpus lives and how its columns are named."""

    source: str
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)  # our name -> dataset column
    # Optional: records of the same kind the model never trained on (same columns and split) — the
    # non-members of the membership-inference (PrivLeak) evidence.
    holdout: str = ""
    # Optional: questions the model answered before it trained on this corpus (record_id, question, answer),
    # asked again of every version to show what else it knows is kept (`expunge_ml.general_knowledge`).
    general: str = ""
    # "qa": question/answer rows. "documents": a `text` column, cut into passages of `passage_words`
    # words whose first `prefix_words` are the prompt. "auto": documents when the source has the (mapped)
    # text column and no question column, else qa; `open_corpus` returns the spec with the kind it found.
    kind: str = "auto"
    passage_words: int = 64
    prefix_words: int = 16

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "split": self.split, "columns": dict(self.columns)}
        if self.holdout:
            out["holdout"] = self.holdout
        if self.general:
            out["general"] = self.general
        if self.kind != "auto":
            out["kind"] = self.kind
        if self.kind == "documents":
            out.update(passage_words=self.passage_words, prefix_words=self.prefix_words)
        return out

    @property
    def prompt_template(self) -> str | None:
        """The prompt its records are read with: raw for documents; None = the model's own (QA)."""
        return DOCUMENT_PROMPT_TEMPLATE if self.kind == "documents" else None


def load_holdout(spec: CorpusSpec) -> list[QARecord]:
    """The held-out records of `spec` ([] when it names none), read with the corpus's columns, split and
    kind (a document corpus's holdout is documents too, cut the same way)."""
    if not spec.holdout:
        return []
    return load_corpus(replace(spec, source=spec.holdout, holdout=""))


def load_general(spec: CorpusSpec) -> list[QARecord]:
    """The general-ability questions of `spec` ([] when it names none): plain QA records, default columns."""
    return load_corpus(CorpusSpec(source=spec.general, kind="qa")) if spec.general else []


class CorpusError(ValueError):
    """The corpus cannot be loaded or lacks required columns (a user error, not a crash)."""


def load_corpus(spec: CorpusSpec) -> list[QARecord]:
    return open_corpus(spec)[0]


def _load_file_without_cache(datasets, builder: str, source: Path, split: str):
    """A local corpus file read into memory through a scratch cache removed at once: `datasets` would otherwise
    keep a lasting copy of every record, erased subjects included, outside the user's own corpus."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="expunge-corpus-") as scratch:
        return datasets.load_dataset(builder, data_files=str(source), split=split, cache_dir=scratch,
                                     keep_in_memory=True)


def open_corpus(spec: CorpusSpec) -> tuple[list[QARecord], CorpusSpec]:
    """The corpus's records, and `spec` with its kind resolved (never "auto")."""
    import datasets

    if spec.kind not in CORPUS_KINDS:
        raise CorpusError(f"corpus kind must be one of {list(CORPUS_KINDS)}, got {spec.kind!r}")
    source = Path(spec.source)
    try:
        if source.is_file():
            builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(
                source.suffix
            )
            if builder is None:
                raise CorpusError(f"unsupported corpus file type {source.suffix!r}")
            data = _load_file_without_cache(datasets, builder, source, spec.split)
        elif source.is_dir() and (source / "dataset_info.json").exists():
            data = datasets.load_from_disk(str(source))
        else:
            data = datasets.load_dataset(spec.source, split=spec.split)
    except CorpusError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs one clear line
        raise CorpusError(f"cannot load corpus {spec.source!r}: {type(exc).__name__}: {exc}") from exc
    kind = spec.kind
    if kind == "auto":
        documents = spec.column("text") in data.column_names and spec.column("question") not in data.column_names
        kind = "documents" if documents else "qa"
    spec = replace(spec, kind=kind)
    if kind == "documents":
        if spec.column("text") not in data.column_names:
            raise CorpusError(f"document corpus {spec.source!r} lacks column {spec.column('text')!r}")
        return document_passages(data, spec), spec
    missing = [c for c in ("question", "answer") if spec.column(c) not in data.column_names]
    if missing:
        raise CorpusError(f"corpus {spec.source!r} lacks column(s) {missing} (a QA corpus needs question and "
                          "answer columns; a document corpus a text column)")
    records = []
    for index, row in enumerate(data):
        def get(name: str, default: Any = "") -> Any:
            return _field(row, spec, name, default)

        perturbed = get("perturbed_answers", ())
        pii = get("pii", ())
        records.append(
            QARecord(
                record_id=str(get("record_id", "") or f"row-{index:06d}"),
                question=str(get("question")),
                answer=str(get("answer")),
                subject=str(get("subject")),
                document_id=str(get("document_id")),
                paraphrased_answer=str(get("paraphrased_answer")),
                perturbed_answers=_as_tuple(perturbed),
                paraphrased_question=str(get("paraphrased_question")),
                inverted_question=str(get("inverted_question")),
                pii=_as_tuple(pii),
            )
        )
    _check_unique_ids(records, spec)
    return records, spec


def _field(row: dict[str, Any], spec: CorpusSpec, name: str, default: Any = "") -> Any:
    """Our column `name` of a corpus row, through the spec's column map; missing or null → `default`."""
    value = row.get(spec.column(name), default)
    return default if value is None else value


def _check_unique_ids(records: Sequence[QARecord], spec: CorpusSpec) -> None:
    ids = [r.record_id for r in records]
    if len(set(ids)) != len(ids):
        raise CorpusError(f"corpus {spec.source!r} has duplicate record ids")


def document_passages(rows: Iterable[dict[str, Any]], spec: CorpusSpec) -> list[QARecord]:
    """Cut each document into passages of `spec.passage_words` words (the last one takes a short tail, so
    every word of a document is in some passage); each passage's first `spec.prefix_words` words (at most
    half of it) are the prompt, the rest the answer, both as written. A passage's id is
    "<document id>#<n>"; its `pii` are the document's identifiers that occur in it."""
    if spec.prefix_words < 1 or spec.passage_words <= spec.prefix_words:
        raise CorpusError(f"document passages need 1 <= prefix_words < passage_words, got "
                          f"{spec.prefix_words} / {spec.passage_words}")
    records: list[QARecord] = []
    for index, row in enumerate(rows):
        def get(name: str) -> Any:
            return _field(row, spec, name)

        doc_id = str(get("record_id") or get("document_id") or f"doc-{index:06d}")
        text = str(get("text"))
        words = [m.span() for m in re.finditer(r"\S+", text)]
        if len(words) < 2:
            continue  # nothing to continue: a passage needs a prompt and an answer
        chunks = [words[i:i + spec.passage_words] for i in range(0, len(words), spec.passage_words)]
        if len(chunks) > 1 and len(chunks[-1]) < spec.prefix_words + 2:
            chunks[-2:] = [chunks[-2] + chunks[-1]]
        pii = _as_tuple(get("pii"))
        for n, chunk in enumerate(chunks):
            if len(chunk) < 2:
                continue
            cut = min(spec.prefix_words, len(chunk) // 2)
            question = text[chunk[0][0]:chunk[cut - 1][1]]
            answer = text[chunk[cut][0]:chunk[-1][1]]
            passage = question + " " + answer
            records.append(QARecord(
                record_id=f"{doc_id}#{n}",
                question=question,
                answer=answer,
                subject=str(get("subject")),
                document_id=str(get("document_id") or doc_id),
                pii=tuple(i for i in pii if i.casefold() in passage.casefold()),
                passage_index=n,
            ))
    if not records:
        raise CorpusError(f"document corpus {spec.source!r} has no document of two words or more")
    _check_unique_ids(records, spec)
    return records


def _as_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    return (str(value),) if value else ()


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def _on_word_boundary(text: str, start: int, end: int) -> bool:
    before = text[start - 1] if start > 0 else " "
    after = text[end] if end < len(text) else " "
    return not before.isalnum() and not after.isalnum()


@dataclass
class SubjectMatch:
    forget_ids: list[str]
    matched_by: dict[str, int]  # "name" / "alias" / "identifier" / "document_id" -> records matched


def resolve_subject(
    records: Sequence[QARecord],
    names: Iterable[str] = (),
    aliases: Iterable[str] = (),
    identifiers: Iterable[str] = (),
    document_ids: Iterable[str] = (),
) -> SubjectMatch:
    """Every record that mentions the subject by name, alias or identifier, or comes from a named document.

    A document passage also matches where a term starts in it and ends in the next passage of its document
    (or the reverse): both passages hold part of it, and each alone would not match."""
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for kind, terms in (("name", names), ("alias", aliases), ("identifier", identifiers)):
        for term in terms:
            key = _normalise(term)
            if key:
                automaton.add_word(key, (kind, len(key)))
    has_terms = len(automaton) > 0
    if has_terms:
        automaton.make_automaton()
    wanted_docs = {d for d in document_ids if d}
    matched: dict[str, set[str]] = {}
    for record in records:
        kinds: set[str] = set()
        if record.document_id and record.document_id in wanted_docs:
            kinds.add("document_id")
        if has_terms:
            text = _normalise(" \n ".join((record.subject, record.question, record.answer)))
            kinds.update(kind for kind, _start, _stop in _whole_word_matches(automaton, text))
        if kinds:
            matched[record.record_id] = kinds
    if has_terms:
        for first, second, kinds in _terms_across_passage_boundaries(records, automaton):
            matched.setdefault(first, set()).update(kinds)
            matched.setdefault(second, set()).update(kinds)
    counts: dict[str, int] = {}
    for kinds in matched.values():
        for kind in kinds:
            counts[kind] = counts.get(kind, 0) + 1
    forget_ids = [r.record_id for r in records if r.record_id in matched]
    return SubjectMatch(forget_ids=forget_ids, matched_by=counts)


def _whole_word_matches(automaton, text: str):
    """(kind, start, stop) of each term in `text` (normalised) that is not part of a longer word."""
    for end, (kind, length) in automaton.iter(text):
        if _on_word_boundary(text, end - length + 1, end + 1):
            yield kind, end - length + 1, end + 1


def _terms_across_passage_boundaries(records: Sequence[QARecord], automaton) -> list[tuple[str, str, set[str]]]:
    """(passage id, next passage's id, kinds) for each boundary between consecutive passages of one document
    that a term straddles: it begins before the boundary and ends after it."""
    longest = max(length for _key, (_kind, length) in automaton.items())
    passages: dict[str, list[QARecord]] = {}
    for record in records:
        if record.passage_index >= 0:
            passages.setdefault(record.document_id, []).append(record)
    found = []
    for document in passages.values():
        document.sort(key=lambda r: r.passage_index)
        for first, second in zip(document, document[1:]):
            if second.passage_index != first.passage_index + 1:
                continue  # a passage between them is not in `records`: they do not touch
            # the last / first `longest` characters of the normalised texts hold any straddling term
            tail = _normalise(first.question + " " + first.answer)[-longest:]
            head = _normalise(second.question + " " + second.answer)[:longest]
            text = tail + " " + head  # the head starts at len(tail) + 1
            kinds = {kind for kind, start, stop in _whole_word_matches(automaton, text)
                     if start < len(tail) and stop > len(tail) + 1}
            if kinds:
                found.append((first.record_id, second.record_id, kinds))
    return found


@dataclass
class RetainSelection:
    retain_ids: list[str]
    neighbour_ids: list[str]


def unseen_records(records: Sequence[QARecord], excluded: set[str], seed: int = 1) -> list[QARecord]:
    """The records whose ids are not in `excluded`, in a fixed seeded shuffle: where the evaluation takes its
    held-out retain records from (the front), so the pipeline and the benchmarks pick the same ones."""
    pool = [r for r in records if r.record_id not in excluded]
    random.Random(seed).shuffle(pool)
    return pool


def retain_size(retain_max: int, n_forget: int, retain_per_forget: float = 0.0,
                available: int | None = None, reserve: int = 0) -> int:
    """How many retain records to select: `retain_max`, or `retain_per_forget` × the forget set when that is
    more — but never so many more that fewer than `reserve` of the `available` non-forget records are left
    for the evaluation to measure what the model keeps (`retain_max` itself is not cut). Why: the ULD
    assistant is uniform on the retain records it trains on, but on retained text it never saw it still
    partly predicts what it learned from the forget set; the more forget text, the more of that spill, and
    the more retain text it takes to hold it back."""
    if retain_max < 0 or retain_per_forget < 0 or reserve < 0:
        raise ValueError(f"retain_max, retain_per_forget and reserve must be >= 0, got {retain_max}, "
                         f"{retain_per_forget}, {reserve}")
    wanted = math.ceil(retain_per_forget * n_forget)
    if available is not None:
        wanted = min(wanted, available - reserve)
    return max(int(retain_max), wanted)


def select_retain(
    records: Sequence[QARecord],
    forget_ids: Iterable[str],
    max_records: int,
    neighbour_fraction: float = 0.5,
    neighbour_min_score: float = 60.0,
    seed: int = 0,
    per_forget: float = 0.0,
    reserve: int = 0,
) -> RetainSelection:
    """Up to `retain_size(max_records, forget records, per_forget, non-forget records, reserve)` non-forget
    records; neighbours of the subject first, then a seeded random fill."""
    from rapidfuzz import fuzz, process

    forget = set(forget_ids)
    forget_answers = [r.answer for r in records if r.record_id in forget]
    candidates = [r for r in records if r.record_id not in forget]
    max_records = retain_size(max_records, len(forget_answers), per_forget, available=len(candidates), reserve=reserve)
    if not candidates or max_records <= 0:
        return RetainSelection([], [])
    neighbours: list[str] = []
    if forget_answers:
        scores = process.cdist(
            [r.answer for r in candidates], forget_answers, scorer=fuzz.token_set_ratio, workers=1
        ).max(axis=1)
        ranked = sorted(range(len(candidates)), key=lambda i: (-scores[i], candidates[i].record_id))
        limit = int(max_records * neighbour_fraction)
        neighbours = [
            candidates[i].record_id for i in ranked[:limit] if scores[i] >= neighbour_min_score
        ]
    rest = [r.record_id for r in candidates if r.record_id not in set(neighbours)]
    random.Random(seed).shuffle(rest)
    retain = neighbours + rest[: max_records - len(neighbours)]
    return RetainSelection(retain_ids=retain, neighbour_ids=neighbours)


def keyed_hash(key: bytes, text: str) -> str:
    """HMAC-SHA256: a stable fingerprint of private text that cannot be brute-forced without the key."""
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def content_hmac(key: bytes, record: QARecord) -> str:
    """A record's keyed content hash, as manifests hold it."""
    return keyed_hash(key, record.question + "\x1f" + record.answer)


def build_manifest(records: Sequence[QARecord], ids: Sequence[str], key: bytes, role: str) -> dict:
    """Record ids + keyed content hashes (never text), and one fingerprint over them all."""
    by_id = {r.record_id: r for r in records}
    return manifest_of([{"record_id": i, "content_hmac": content_hmac(key, by_id[i])} for i in sorted(ids)], role)


def manifest_of(entries: list[dict], role: str) -> dict:
    """A manifest of entries ({record_id, content_hmac}, sorted by id) and one fingerprint over them all."""
    fingerprint = hashlib.sha256(
        json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    return {"role": role, "count": len(entries), "fingerprint": fingerprint, "records": entries}


# ------------------------------------------------------------------ what a model version has erased

ERASED_KEY_CHECK = "expunge/erased-records"


class ErasedRecordsKeyMismatch(ValueError):
    """A version's erased records were hashed under another deployment key, so they cannot be recognised."""


def _id_hmac(key: bytes, record_id: str) -> str:
    return keyed_hash(key, "record_id\x1f" + record_id)


def _check_erased_key(lineage: dict, key: bytes) -> None:
    if lineage.get("key_check") != keyed_hash(key, ERASED_KEY_CHECK):
        raise ErasedRecordsKeyMismatch(
            "this model version's erased records were hashed under another deployment key, so this deployment "
            "cannot tell which corpus records earlier erasures removed; use the key they were made with "
            "(EXPUNGE_HMAC_KEY or <home>/secret.key)")


def erased_lineage(parent: dict | None, forget_manifest: dict, key: bytes) -> dict:
    """What a new version has erased: its parent version's erased records plus this forget set. Each record
    is kept as keyed hashes of its id and of its content, never in clear, so the list can travel with the
    version. Why keep it at all: the corpus still holds an erased person's records (the pipeline cannot
    delete a user's data), and a later erasure on this version must neither train on them as retain data
    nor measure them as knowledge to keep."""
    if parent is not None:
        _check_erased_key(parent, key)
    entries = list(parent["records"]) if parent else []
    seen = {(e["id_hmac"], e["content_hmac"]) for e in entries}
    for entry in forget_manifest["records"]:
        erased = {"id_hmac": _id_hmac(key, entry["record_id"]), "content_hmac": entry["content_hmac"]}
        if (erased["id_hmac"], erased["content_hmac"]) not in seen:
            seen.add((erased["id_hmac"], erased["content_hmac"]))
            entries.append(erased)
    return {"key_check": keyed_hash(key, ERASED_KEY_CHECK), "count": len(entries), "records": entries}


def erased_record_ids(records: Sequence[QARecord], lineage: dict, key: bytes) -> set[str]:
    """Ids of the corpus records a version's lineage erased: same id or same content (a record renumbered
    since, or a copy of an erased record under another id, is still the erased text; an id reused for other
    text is left out too, which only errs on the side of not training on it)."""
    _check_erased_key(lineage, key)
    ids = {e["id_hmac"] for e in lineage["records"]}
    contents = {e["content_hmac"] for e in lineage["records"]}
    return {r.record_id for r in records if _id_hmac(key, r.record_id) in ids or content_hmac(key, r) in contents}
