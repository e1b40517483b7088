"""A watched folder for teams without an API: request files dropped into `<home>/inbox/` are submitted, then
moved to `inbox/accepted/` (stored: received or needs_review) or `inbox/rejected/` with a `.reason.txt` beside it.
`expunge inbox` takes them, and so does every `expunge run` before it processes anything."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from expunge.service import EXIT_NEEDS_REVIEW, EXIT_OK, SubmitResult, submit
from expunge.settings import Settings

REQUEST_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class InboxOutcome:
    file: str
    result: SubmitResult
    moved_to: str


def inbox_dir(settings: Settings) -> Path:
    return settings.home / "inbox"


def _destination(folder: Path, name: str) -> Path:
    """`folder/name`, or a name with the time added when a file of that name is there already."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = folder / name
    if target.exists():
        stem, suffix = os.path.splitext(name)
        target = folder / f"{stem}.{time.strftime('%Y%m%dT%H%M%S')}.{time.monotonic_ns() % 10**6}{suffix}"
    return target


def take_inbox(settings: Settings) -> list[InboxOutcome]:
    """Submit every request file waiting in the inbox, oldest name first, and move each where its outcome says."""
    inbox = inbox_dir(settings)
    if not inbox.is_dir():
        return []
    outcomes = []
    for path in sorted(p for p in inbox.iterdir() if p.is_file() and p.suffix.lower() in REQUEST_SUFFIXES):
        result = submit(settings, path)
        stored = result.exit_code in (EXIT_OK, EXIT_NEEDS_REVIEW)
        target = _destination(inbox / ("accepted" if stored else "rejected"), path.name)
        os.replace(path, target)
        if not stored:  # what to correct: the reason code and message (no subject data: they name fields only)
            target.with_name(target.name + ".reason.txt").write_text(f"{result.reason_code}: {result.message}\n")
        outcomes.append(InboxOutcome(path.name, result, str(target)))
    return outcomes


def expire_filed_requests(settings: Settings, now: float | None = None) -> list[str]:
    """Delete filed request files (accepted or rejected) older than `privacy.retention_days`: they hold the
    subject in clear, and the database has what the pipeline needs. The names deleted."""
    cutoff = (now or time.time()) - settings.retention_days * 86400
    deleted = []
    for folder in ("accepted", "rejected"):
        for path in sorted((inbox_dir(settings) / folder).glob("*")):
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                deleted.append(f"{folder}/{path.name}")
    return deleted
