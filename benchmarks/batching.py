"""`expunge benchmark batching`: N erasures forgotten one at a time, then the same N people forgotten in one batch,
by the scheduled drain on one champion: wall time of each drain, and each ticket's gates and headline numbers.

Both drains run in one home on the same champion (nothing is approved, so every erasure starts from the same
model) and in this order; the output names people by their index in the world's `people.jsonl`, never by name.
"""
from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from .subjects import DEFAULT_OUT_DIR, person_request, ticket_row

MODES = (("one_at_a_time", 1), ("batch", None))  # None: the whole batch in one run


@dataclass(frozen=True)
class BatchingOptions:
    profile: str = "demo"
    people: tuple[int, ...] = tuple(range(5))
    home: Optional[str] = None  # default: a new temporary directory
    out_dir: Optional[str] = str(DEFAULT_OUT_DIR)
    name: str = "batching"


def _profile_with_batch_max(profile: str, batch_max: int, directory: Path, mode: str) -> str:
    from expunge.settings import load_profile

    loaded = load_profile(profile)
    loaded["scheduling"] = {**(loaded.get("scheduling") or {}), "batch_max": batch_max}
    path = directory / f"batching-{mode}.yaml"
    path.write_text(yaml.safe_dump(loaded, sort_keys=False))
    return str(path)


def _drain(home: Path, profile: str, people: list[dict], indices: tuple[int, ...], mode: str,
           log: Callable[[str], None]) -> tuple[float, list[dict[str, Any]]]:
    """Submit one erasure per person, drain them all, time the drain; the tickets' rows."""
    from expunge.service import submit
    from expunge.settings import Settings
    from flows.drain import drain_requests

    settings = Settings(home=home, profile_name=profile)
    requests_dir = home / "batching_requests"  # the requests name people: they stay in the private home
    requests_dir.mkdir(exist_ok=True)
    tickets = {}
    for index in indices:
        ticket = f"BATCHING-{mode.upper().replace('_', '-')}-{index}"
        path = requests_dir / f"{ticket}.yaml"
        path.write_text(yaml.safe_dump(person_request(people[index], ticket)))
        submitted = submit(settings, path)
        if submitted.exit_code not in (0, 3):  # 3: filed by an earlier run in this home, taken up as it is
            raise RuntimeError(f"{ticket}: {submitted.message}")
        tickets[ticket] = index
    started = time.perf_counter()
    outcomes = drain_requests(home=str(home), profile=profile)
    seconds = time.perf_counter() - started
    log(f"{mode}: {len(tickets)} erasures in {seconds:.0f} s: {outcomes}")
    rows = [{**ticket_row(settings.ticket_dir(t), mode, i, t, outcomes.get(t, "not_run")), **_first_verdict(settings, t)}
            for t, i in tickets.items()]
    return seconds, rows


def _first_verdict(settings, ticket: str) -> dict[str, Any]:
    """The ticket's first evaluation (in a batch: the batch's, before any retry alone) from the audit log, and how
    many evaluations it took to settle."""
    from db import requests_repo

    with settings.db_session() as session:
        evaluations = requests_repo.events_of(session, ticket, "evaluated")
        trainings = requests_repo.events_of(session, ticket, "unlearning_trained")
    if not evaluations:
        return {"evaluations": 0}
    first = evaluations[0]
    return {"evaluations": len(evaluations), "first_passed": all(g["passed"] for g in first["gates"]),
            "first_failed_gates": [g["gate"] for g in first["gates"] if not g["passed"]],
            "first_forget_rougeL": round(first["metrics"]["unlearned"]["forget"]["rougeL_recall"], 4),
            "first_forget_nll": trainings[0]["convergence"][0]["forget_nll"] if trainings else None}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: tickets that passed every gate, and the median of each headline number."""
    summary = {}
    for mode in {r["profile"] for r in rows}:
        mine = [r for r in rows if r["profile"] == mode]
        entry = {"tickets": len(mine), "passed_every_gate": sum(bool(r.get("passed")) for r in mine),
                 "passed_first_evaluation": sum(bool(r.get("first_passed")) for r in mine),
                 "evaluations": sum(r.get("evaluations", 0) for r in mine)}
        for key in ("forget_rougeL", "neighbour_rougeL_ratio", "degenerate_share", "first_forget_rougeL"):
            values = [r[key] for r in mine if r.get(key) is not None]
            entry[f"median_{key}"] = round(statistics.median(values), 4) if values else None
        summary[mode] = entry
    return summary


def run_batching(options: BatchingOptions, log: Callable[[str], None],
                 command: str = "benchmarks.batching.run_batching(...)") -> dict[str, Any]:
    from expunge.settings import Settings
    from flows.bootstrap import bootstrap_sample_model

    home = Path(options.home or tempfile.mkdtemp(prefix="expunge-batching-")).resolve()
    Settings(home=home, profile_name=options.profile).apply_environment()
    boot = bootstrap_sample_model(home=str(home), profile=options.profile)
    people = [json.loads(line) for line in Path(boot["world"]["people"]).read_text().splitlines()]
    if any(i >= len(people) for i in options.people):
        raise ValueError(f"the sample world has {len(people)} people; --people {options.people} asks for more")
    seconds, rows = {}, []
    for mode, batch_max in MODES:
        profile = _profile_with_batch_max(options.profile, batch_max or len(options.people), home, mode)
        seconds[mode], mode_rows = _drain(home, profile, people, options.people, mode, log)
        rows += mode_rows
    n = len(options.people)
    one = seconds["one_at_a_time"] / n
    return {
        "command": command, "options": asdict(options) | {"home": str(home)}, "base_model_uri": boot["model_uri"],
        "date": datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
        "seconds": {mode: round(s, 1) for mode, s in seconds.items()},
        "one_erasure_seconds": round(one, 1),
        # P4 of `expunge benchmark perf`: a batch of N erasures in one run ÷ one erasure run alone
        "batch_over_one": round(seconds["batch"] / one, 3),
        "batch_over_all_alone": round(seconds["batch"] / seconds["one_at_a_time"], 3),
        "rows": rows, "summary": summarise(rows),
    }


def write_report(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    n = len(result["options"]["people"])
    lines = [
        f"# {n} erasures: one at a time, and in one batch", "",
        f"Command: `{result['command']}`, {result['date']}; base {result['base_model_uri']}; {result['machine']}.", "",
        "| | wall time (s) | per erasure (s) | passed at the first evaluation | median forget ROUGE-L there | "
        "evaluations | passed in the end |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, _ in MODES:
        s = result["summary"][mode]
        lines.append(f"| {mode.replace('_', ' ')} | {result['seconds'][mode]} | {result['seconds'][mode] / n:.1f} | "
                     f"{s['passed_first_evaluation']}/{s['tickets']} | {s['median_first_forget_rougeL']} | "
                     f"{s['evaluations']} | {s['passed_every_gate']}/{s['tickets']} |")
    lines += ["", f"A batch of {n} took {result['batch_over_one']}× one erasure run alone "
                  f"({result['batch_over_all_alone']}× the {n} run one at a time). Both drains ran in this order in "
                  "one process on one champion; each time includes resolving, training, evaluating, registering "
                  "and reporting. A batch ticket that fails its own gates is split out and run again alone: "
                  "\"first\" is the batch's evaluation, \"in the end\" the ticket's last.", "",
              "| person | mode | first evaluation: failed gates | forget NLL of its assistant | forget ROUGE-L | "
              "status in the end |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['person_index']} | {r['profile']} | {', '.join(r.get('first_failed_gates') or []) or 'none'} | "
              f"{r.get('first_forget_nll')} | {r.get('first_forget_rougeL')} | {r['status']} |"
              for r in sorted(result["rows"], key=lambda r: (r["person_index"], r["profile"]))]
    md_path = out_dir / f"{name}.md"
    md_path.write_text("\n".join(lines) + "\n")
    return [json_path, md_path]
