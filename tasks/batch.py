"""Several tickets on one champion, forgotten by one assistant: their forget sets joined, each ticket still
resolved, evaluated and gated on its own (`flows/process_batch.py`).

A batch has its own work directory (`work/<batch id>/`) holding the joined manifests and the training. Each
ticket's directory keeps its own forget manifest; its `target.json` also lists the records its batch-mates erase
(`batch_erased_ids`), so its evaluation neither counts them as knowledge to keep nor measures utility on them.
"""
from __future__ import annotations

import dataclasses
import hashlib

from prefect import task

from expunge_ml.corpus import manifest_of

from tasks.context import read_json, settings_for, write_json
from tasks.contracts import ResolvedRequest

# What must agree for tickets to share one assistant: the version they are built on and what it serves.
SAME_TARGET_KEYS = ("pinned_uri", "requested_uri", "base_weights_sha256", "prior_assistants", "corpus",
                    "erased_before")


class BatchMismatch(ValueError):
    """The batch's tickets resolved to different target versions (the champion moved between them)."""


def batch_id_for(ticket_ids: list[str]) -> str:
    """A work-directory name for the batch, the same for the same tickets."""
    return "batch-" + hashlib.sha256("\x1f".join(sorted(ticket_ids)).encode()).hexdigest()[:12]


def batch_key(spec, target_model_uri: str) -> tuple | None:
    """Tickets with the same key can be forgotten together; None for one that always runs alone (a method that
    edits the model's weights makes one model per request)."""
    if spec.method != "uld":
        return None
    corpus = spec.corpus.model_dump_json() if spec.corpus else ""
    return (target_model_uri, spec.type, spec.registered_name or "", corpus)


def merged_spec(specs: list):
    """One request naming every subject of the batch (in memory only: it is the subjects' text)."""
    first = specs[0]

    def union(field: str) -> list[str]:
        return list(dict.fromkeys(term for spec in specs for term in getattr(spec.subject, field)))

    subject = first.subject.model_copy(update={f: union(f) for f in ("names", "aliases", "identifiers",
                                                                     "document_ids")})
    return first.model_copy(update={"subject": subject})


def _joined_manifest(paths: list[str], role: str, leave_out: set[str] = frozenset()) -> dict:
    """The records of several manifests, each once, as `build_manifest` writes them."""
    entries = {}
    for path in paths:
        for entry in read_json(path)["records"]:
            if entry["record_id"] not in leave_out:
                entries[entry["record_id"]] = entry
    return manifest_of([entries[i] for i in sorted(entries)], role)


def _check_same_target(targets: dict[str, dict]) -> None:
    reference = next(iter(targets.values()))
    differing = sorted(t for t, info in targets.items()
                       if any(info.get(k) != reference.get(k) for k in SAME_TARGET_KEYS))
    if differing:
        raise BatchMismatch(f"tickets {', '.join(differing)} resolved to another target version than the batch")


@task(name="join-batch")
def join_batch(home: str, profile: str, batch_id: str,
               members: dict[str, ResolvedRequest]) -> tuple[ResolvedRequest, dict[str, ResolvedRequest]]:
    """(the batch's resolved request: union of forget sets, union of retain sets less any forget record; each
    ticket's resolved request as evaluated in the batch: its own forget set, the batch's retain set, its
    batch-mates' forget records marked erased)."""
    settings = settings_for(home, profile)
    targets = {ticket: read_json(r.target_path) for ticket, r in members.items()}
    _check_same_target(targets)
    work = settings.ticket_dir(batch_id)
    forget = _joined_manifest([r.forget_manifest for r in members.values()], "forget")
    forget_ids = {e["record_id"] for e in forget["records"]}
    retain = _joined_manifest([r.retain_manifest for r in members.values()], "retain", leave_out=forget_ids)
    neighbours = {i for r in members.values() for i in read_json(r.retain_manifest).get("neighbour_ids", ())}
    retain["neighbour_ids"] = sorted(neighbours - forget_ids)
    first = next(iter(members.values()))
    # a ticket's own earlier-erased records leave out its own forget set; the batch's leave out the union's
    earlier = {i for info in targets.values() for i in info.get("erased_before_ids", ())} - forget_ids
    target = {**next(iter(targets.values())), "erased_before_ids": sorted(earlier)}
    joined = dataclasses.replace(
        first,
        target_path=str(write_json(work / "target.json", target)),
        forget_manifest=str(write_json(work / "forget_manifest.json", forget)),
        retain_manifest=str(write_json(work / "retain_manifest.json", retain)),
        forget_count=forget["count"], retain_count=retain["count"], neighbour_count=len(retain["neighbour_ids"]),
        erased_before_count=len(earlier),
        forget_fingerprint=forget["fingerprint"], retain_fingerprint=retain["fingerprint"],
        matched_by={k: sum(r.matched_by.get(k, 0) for r in members.values())
                    for k in {k for r in members.values() for k in r.matched_by}},
    )
    write_json(work / "resolved.json", {**joined.as_json(), "tickets": sorted(members)})
    in_batch = {}
    for ticket, resolved in members.items():
        own = {e["record_id"] for e in read_json(resolved.forget_manifest)["records"]}
        target = {**targets[ticket], "batch_id": batch_id, "batch_erased_ids": sorted(forget_ids - own)}
        in_batch[ticket] = dataclasses.replace(
            resolved, target_path=str(write_json(settings.ticket_dir(ticket) / "target.json", target)),
            retain_manifest=joined.retain_manifest, retain_count=joined.retain_count,
            neighbour_count=joined.neighbour_count, retain_fingerprint=joined.retain_fingerprint)
        write_json(settings.ticket_dir(ticket) / "resolved.json", in_batch[ticket].as_json())
    return joined, in_batch
