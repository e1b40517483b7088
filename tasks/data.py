"""Resolve a request's subject to its forget set and build the retain set; write id+hash manifests."""
from __future__ import annotations

from prefect import get_run_logger, task

from db import requests_repo
from expunge.intake import corpus_spec_for, load_records, match_subject, target_for
from expunge.requests import RequestError, RequestSpec
from expunge_ml.corpus import (
    CorpusSpec,
    ErasedRecordsKeyMismatch,
    build_manifest,
    erased_record_ids,
    load_corpus,
    select_retain,
    unseen_records,
)
from tasks.context import read_json, settings_for, write_json
from tasks.contracts import ResolvedRequest


class SubjectNotFound(RequestError):
    pass


def _target_description(target, corpus: CorpusSpec, erased_before: set[str]) -> dict:
    """target.json: what the later tasks need of the target model and the corpus it was trained on."""
    return {
        "requested_uri": target.requested_uri,
        "pinned_uri": target.pinned_uri,
        "registered_name": target.registered_name,
        "kind": target.kind,
        "base_location": target.base_location,
        "base_uri": target.base_uri,
        "base_weights_sha256": target.base_weights_sha256,
        # a document corpus's passages are read raw, whatever frame the target was registered with
        "prompt_template": corpus.prompt_template or target.prompt_template,
        "prior_assistants": target.prior_assistants,
        "relative_top": target.relative_top,
        "corpus": corpus.as_dict(),
        "erased_before": target.erased,  # carried into the new version with this forget set added
        "erased_before_ids": sorted(erased_before),
    }


@task(name="resolve-forget-set")
def resolve_forget_set(home: str, profile: str, ticket_id: str) -> ResolvedRequest:
    settings = settings_for(home, profile)
    with settings.db_session() as session:
        request = requests_repo.get_request(session, ticket_id)
        spec = RequestSpec.model_validate_json(request.spec_json)
    target = target_for(spec)
    records, corpus = load_records(corpus_spec_for(spec, target), ticket_id)  # corpus: its kind resolved
    match = match_subject(spec, records)
    if not match.forget_ids:
        raise SubjectNotFound("subject_not_found", "the subject matches no training record", ticket_id)
    key = settings.hmac_key()
    # Records an earlier erasure on this version removed stay in the corpus; they are neither retain data
    # nor utility to measure (a person asked for again is in the forget set instead).
    erased_before: set[str] = set()
    if target.erased is not None:
        try:
            erased_before = erased_record_ids(records, target.erased, key) - set(match.forget_ids)
        except ErasedRecordsKeyMismatch as exc:
            raise RequestError("erased_records_key", str(exc), ticket_id) from exc
    unlearning = settings.profile["unlearning"]
    # a larger retain set (retain_per_forget) must still leave the evaluation its held-out retained records
    retain = select_retain([r for r in records if r.record_id not in erased_before], match.forget_ids,
                           int(unlearning["retain_max"]), seed=0,
                           per_forget=float(unlearning.get("retain_per_forget", 0.0)),
                           reserve=int(settings.profile["evaluation"]["retain_eval_max"]))
    work = settings.ticket_dir(ticket_id)
    forget_manifest = build_manifest(records, match.forget_ids, key, "forget")
    retain_manifest = build_manifest(records, retain.retain_ids, key, "retain")
    retain_manifest["neighbour_ids"] = sorted(retain.neighbour_ids)
    target_info = _target_description(target, corpus, erased_before)
    documents = corpus.kind == "documents"  # how the documents were cut: what a record of the manifests is
    resolved = ResolvedRequest(
        target_path=str(write_json(work / "target.json", target_info)),
        forget_manifest=str(write_json(work / "forget_manifest.json", forget_manifest)),
        retain_manifest=str(write_json(work / "retain_manifest.json", retain_manifest)),
        forget_count=forget_manifest["count"],
        retain_count=retain_manifest["count"],
        neighbour_count=len(retain.neighbour_ids),
        erased_before_count=len(erased_before),
        forget_fingerprint=forget_manifest["fingerprint"],
        retain_fingerprint=retain_manifest["fingerprint"],
        matched_by=dict(match.matched_by),
        target_uri=target.pinned_uri or target.requested_uri,
        corpus_kind=corpus.kind,
        passage_words=corpus.passage_words if documents else None,
        prefix_words=corpus.prefix_words if documents else None,
    )
    write_json(work / "resolved.json", resolved.as_json())
    get_run_logger().info(
        "forget set: %d records (%s); retain set: %d (%d neighbours); %d records of earlier erasures left out",
        resolved.forget_count, ", ".join(f"{k}={v}" for k, v in sorted(match.matched_by.items())),
        resolved.retain_count, resolved.neighbour_count, resolved.erased_before_count,
    )
    return resolved


class CorpusDrift(RuntimeError):
    """The corpus changed between resolving the request and using its records."""


def records_for_manifest(settings, target_info: dict, manifest_path: str):
    """Re-read the records a manifest names and check their keyed hashes: no silent corpus drift."""
    from expunge_ml.corpus import content_hmac

    manifest = read_json(manifest_path)
    records = {r.record_id: r for r in load_corpus(CorpusSpec(**target_info["corpus"]))}
    key = settings.hmac_key()
    selected = []
    for entry in manifest["records"]:
        record = records.get(entry["record_id"])
        if record is None or content_hmac(key, record) != entry["content_hmac"]:
            raise CorpusDrift(f"record {entry['record_id']} changed or vanished since the manifest was written")
        selected.append(record)
    return selected


def _erased(target_info: dict, forget_ids: set[str]) -> set[str]:
    """This request's forget ids, the records earlier erasures on the target version removed, and those the other
    tickets of its batch erase in the same version (`tasks.batch`)."""
    return set(forget_ids) | set(target_info.get("erased_before_ids", ())) | set(target_info.get("batch_erased_ids", ()))


def unseen_retain_pool(target_info: dict, forget_ids: set[str], train_retain_ids: set[str], seed: int = 1):
    """The corpus records neither erased (now or by an earlier erasure on this version) nor trained on, in
    a fixed shuffled order: the evaluation takes its held-out retain records from the front
    (`held_out_retain`), the ULD weight selection its validation records from right after them, so the two
    never share a record."""
    records = load_corpus(CorpusSpec(**target_info["corpus"]))
    return unseen_records(records, _erased(target_info, forget_ids) | set(train_retain_ids), seed), records


def held_out_retain(target_info: dict, forget_ids: set[str], train_retain_ids: set[str], limit: int, seed: int = 1):
    """Retain questions the assistant never trained on, so utility is measured, not memorised (a corpus too
    small for `limit` of them falls back to every record not erased, trained-on ones included)."""
    unseen, records = unseen_retain_pool(target_info, forget_ids, train_retain_ids, seed)
    if len(unseen) >= limit:
        return unseen[:limit]
    return unseen_records(records, _erased(target_info, forget_ids), seed)[:limit]


def holdout_records(target_info: dict, forget, limit: int):
    """The corpus's held-out records (never trained on; membership-inference non-members), at most `limit`,
    less any that is a forget record under another id: that would make a member a non-member."""
    from expunge_ml.corpus import load_holdout

    forget_questions = {r.question for r in forget}
    return [r for r in load_holdout(CorpusSpec(**target_info["corpus"])) if r.question not in forget_questions][:limit]


def earlier_erasure_records(target_info: dict, per_subject: int):
    """The records earlier erasures in the target's lineage removed (`erased_before_ids`), at most `per_subject`
    per subject: the regression gate's probes."""
    ids = set(target_info.get("erased_before_ids", ()))
    if not ids:
        return []
    return at_most_per_subject([r for r in load_corpus(CorpusSpec(**target_info["corpus"])) if r.record_id in ids],
                               per_subject)


def at_most_per_subject(records, limit: int) -> list:
    """The first `limit` records of each subject, in their order."""
    taken: dict[str, int] = {}
    chosen = []
    for record in records:
        subject = record.subject or ""
        if taken.get(subject, 0) < limit:
            taken[subject] = taken.get(subject, 0) + 1
            chosen.append(record)
    return chosen


def general_records(target_info: dict, limit: int):
    """The target's general-ability questions (`CorpusSpec.general`), at most `limit`."""
    from expunge_ml.corpus import load_general

    return load_general(CorpusSpec(**target_info["corpus"]))[:limit]


def general_retain_records(target_info: dict, n: int, seed: int):
    """`n` general-knowledge questions for ULD's retain⁺, none of them the target's evaluated ones."""
    from expunge_ml.general_knowledge import retain_questions

    return retain_questions({r.record_id for r in general_records(target_info, 10**6)}, n, seed)


def selection_retain(target_info: dict, forget_ids: set[str], train_retain_ids: set[str], eval_limit: int,
                     limit: int, seed: int = 1):
    """Validation records for choosing ULD's w: unseen records after the evaluation's `eval_limit`, at most
    `limit`. Raises when none are left, rather than score on the evaluation's own records."""
    unseen, _ = unseen_retain_pool(target_info, forget_ids, train_retain_ids, seed)
    validation = unseen[eval_limit:eval_limit + limit]
    if not validation:
        raise ValueError(f"weight selection on held-out records: the corpus has {len(unseen)} records neither "
                         f"erased nor trained on, and the evaluation takes the first {eval_limit}; lower "
                         "evaluation.retain_eval_max or set unlearning.weight_selection.retained: training")
    return validation
