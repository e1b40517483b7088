"""From a validated request to the data it concerns: target model, corpus, matching records.

Used both when a request is submitted (to reject or flag it at once) and when the flow runs.
"""
from __future__ import annotations

from expunge.requests import RequestError, RequestSpec
from expunge_ml.corpus import CorpusError, CorpusSpec, QARecord, SubjectMatch, keyed_hash, open_corpus, resolve_subject
from models_registry.registry import ModelNotFound, ResolvedTarget, resolve_target


def target_for(spec: RequestSpec) -> ResolvedTarget:
    try:
        return resolve_target(spec.target_model)
    except ModelNotFound as exc:
        raise RequestError("unknown_model", str(exc), spec.ticket_id) from None


def corpus_spec_for(spec: RequestSpec, target: ResolvedTarget) -> CorpusSpec:
    """The request may name a corpus; otherwise the registry knows what the target was trained on."""
    if spec.corpus is not None:
        return CorpusSpec(**spec.corpus.model_dump())
    if target.corpus:
        return CorpusSpec(**target.corpus)
    raise RequestError(
        "no_corpus",
        f"no training corpus known for {spec.target_model}: add a 'corpus:' section to the request",
        spec.ticket_id,
    )


def load_records(corpus: CorpusSpec, ticket_id: str | None = None) -> tuple[list[QARecord], CorpusSpec]:
    """The corpus's records, and its spec with the kind (qa / documents) it was read as."""
    try:
        return open_corpus(corpus)
    except CorpusError as exc:
        raise RequestError("corpus_unavailable", str(exc), ticket_id) from None


def match_subject(spec: RequestSpec, records: list[QARecord]) -> SubjectMatch:
    s = spec.subject
    return resolve_subject(records, s.names, s.aliases, s.identifiers, s.document_ids)


REDACTED_PREFIX = "hmac-sha256:"


def _term_hash(key: bytes, term: str) -> str:
    return term.removeprefix(REDACTED_PREFIX) if term.startswith(REDACTED_PREFIX) else keyed_hash(key, term.casefold())


def redact_subject(key: bytes, spec: RequestSpec) -> RequestSpec:
    """The same request with every subject term replaced by its keyed hash: once a release decision is
    made the pipeline no longer needs to know who it was, so the request row stops saying it."""
    subject = spec.subject.model_copy(update={
        kind: [REDACTED_PREFIX + _term_hash(key, t) for t in getattr(spec.subject, kind)]
        for kind in ("names", "aliases", "identifiers", "document_ids")
    })
    return spec.model_copy(update={"subject": subject})


def is_redacted(spec: RequestSpec) -> bool:
    s = spec.subject
    terms = [*s.names, *s.aliases, *s.identifiers, *s.document_ids]
    return bool(terms) and all(t.startswith(REDACTED_PREFIX) for t in terms)


def purge_subject_row(session, request, key: bytes, why: str) -> int:
    """Replace the request row's subject terms by their keyed hashes (the only place they were kept in clear);
    audited as `subject_purged` with counts and `why`. Returns how many terms were hashed (0: done before)."""
    from db import requests_repo
    from db.audit import canonical_json

    if not request.spec_json or request.request_type == "unknown":  # a rejection that never parsed: nothing kept
        return 0
    spec = RequestSpec.model_validate_json(request.spec_json)
    if is_redacted(spec) or not any((spec.subject.names, spec.subject.aliases, spec.subject.identifiers,
                                     spec.subject.document_ids)):
        return 0
    request.spec_json = canonical_json(redact_subject(key, spec).model_dump(mode="json"))
    s = spec.subject
    counts = {k: len(getattr(s, k)) for k in ("names", "aliases", "identifiers", "document_ids")}
    requests_repo.record_event(session, request.ticket_id, "subject_purged", {"terms_hashed": counts, "why": why})
    return sum(counts.values())


def subject_fingerprints(key: bytes, spec: RequestSpec) -> dict[str, list[str]]:
    """Keyed hashes of every subject term: lets an auditor confirm 'this person' without the log naming them
    (the same hashes before and after `redact_subject`)."""
    s = spec.subject
    return {
        kind: sorted(_term_hash(key, term) for term in terms)
        for kind, terms in (
            ("names", s.names), ("aliases", s.aliases), ("identifiers", s.identifiers), ("document_ids", s.document_ids)
        )
        if terms
    }
