"""The CLI's command groups: `expunge audit …`, `expunge exclusions …`, `expunge consolidation …`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from expunge.console import err, fail, out, print_gates, state

audit_app = typer.Typer(help="Inspect the hash-chained audit log.", no_args_is_help=True)
exclusions_app = typer.Typer(help="The records a base retrained from scratch must leave out.", no_args_is_help=True)
consolidation_app = typer.Typer(help="Distil a champion's stacked assistants into one model.", no_args_is_help=True)


@audit_app.command("verify")
def audit_verify(
    expected_head: Optional[str] = typer.Option(None, help="Head hash recorded elsewhere (detects a truncated tail)."),
    from_file: Optional[Path] = typer.Option(None, "--file", help="Check an exported copy (`audit export`) instead of "
                                             "the database: no access to the deployment needed."),
) -> None:
    """Recompute every hash of the audit chain and check each event's seal with the deployment key (an auditor
    given EXPUNGE_HMAC_KEY checks an export's seals too); exit 1 and name each broken event if tampered."""
    if from_file is not None:
        from types import SimpleNamespace

        from db.audit import verify_rows

        try:
            rows = [SimpleNamespace(**json.loads(line)) for line in from_file.read_text().splitlines() if line]
        except (OSError, ValueError, TypeError) as exc:
            fail(f"cannot read the exported log {from_file}: {exc}", 2)
        result = verify_rows(rows, expected_head, state.settings.audit_seal_key(create=False))
    else:
        from expunge.service import verify_audit

        result = verify_audit(state.settings, expected_head)
    if not result.ok:
        for problem in result.problems:
            err.print(f"audit: {problem}", markup=False)
        fail(f"audit chain BROKEN ({len(result.problems)} problem(s) in {result.n_events} events)", 1)
    if from_file is not None:
        out.print(f"audit chain OK: {result.n_events} events in {from_file}, head {result.head_hash}{_seals(result)}"
                  + ("" if expected_head else "; compare the head with the one the deployment anchored"), markup=False)
        return
    from db.anchor import anchor_path

    anchored = anchor_path(state.settings.db_url)
    out.print(f"audit chain OK: {result.n_events} events, head {result.head_hash}{_seals(result)}"
              + (f"; checked against the anchor {anchored}" if anchored and anchored.exists() else
                 "; no anchor outside the database (set EXPUNGE_AUDIT_ANCHOR)"), markup=False)


def _seals(result) -> str:
    if result.sealed is None:
        return "; seals not checked (no deployment key here: EXPUNGE_HMAC_KEY)"
    older = f", {result.unsealed_before} written before sealing" if result.unsealed_before else ""
    return f"; {result.sealed} seals checked{older}"


@audit_app.command("export")
def audit_export(out_file: Path = typer.Option(..., "--out", help="JSON Lines file to write.")) -> None:
    """Write the audit log as stored (ids, counts and keyed hashes only) for an auditor, who checks it with
    `expunge audit verify --file` and the head hash."""
    from db.audit import export_rows, verify_rows
    from types import SimpleNamespace

    def written(session, handle):  # each row checked as it is written: the log is never held in memory
        for row in export_rows(session):
            handle.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
            yield SimpleNamespace(**row)

    with state.settings.db_session() as session, out_file.open("w") as handle:
        result = verify_rows(written(session, handle))
    out.print(f"{result.n_events} events → {out_file}; head {result.head_hash}"
              + ("" if result.ok else f" (the log has {len(result.problems)} problem(s): run `expunge audit verify`)"))


@exclusions_app.command("export")
def exclusions_export(
    out_file: Path = typer.Option(..., "--out", help="JSON Lines file to write (one record per line)."),
) -> None:
    """Every released (or reopened) erasure's record ids and keyed content hashes, for retraining the base."""
    from expunge.service import exclusion_rows

    rows = exclusion_rows(state.settings)
    out_file.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    missing = sorted({r["ticket_id"] for r in rows if r["record_id"] is None})
    out.print(f"{len(rows) - len(missing)} records of {len({r['ticket_id'] for r in rows})} erasures → {out_file}")
    if missing:
        err.print(f"warning: no forget manifest for {', '.join(missing)}: listed without record ids", markup=False)


@consolidation_app.command("run")
def consolidation_run(
    model_name: str = typer.Argument(..., help="Registered model whose champion to consolidate."),
    min_assistants: int = typer.Option(2, help="Consolidate only a champion serving at least this many assistants."),
) -> None:
    """Distil the champion (base + stacked assistants) into one model, gate it against the champion (every erasure
    stays erased, what was kept stays) and register it; `challenger` when its gates pass."""
    from expunge.service import EXIT_RUN_FAILED

    state.settings.apply_environment()
    from flows.consolidate import consolidate_champion

    result = consolidate_champion(model_name=model_name, home=str(state.settings.home),
                                  profile=state.settings.profile_name, min_assistants=min_assistants)
    if result["status"] == "skipped":
        out.print(f"nothing to consolidate: {result['reason']}")
        return
    out.print(f"{result['champion']} consolidated into {result['model_uri']}: {result['status']}")
    print_gates(result["gates"])
    if result["status"] != "completed":
        raise typer.Exit(EXIT_RUN_FAILED)
    out.print(f"next: a reviewer releases it with `expunge consolidation release {result['model_uri']} --reviewer NAME`;"
              " the assistants it replaces are then deleted")


@consolidation_app.command("release")
def consolidation_release(
    model_uri: str = typer.Argument(..., help="The consolidated version, models:/NAME/N."),
    reviewer: str = typer.Option(..., "--reviewer", help="Who releases it (recorded in the audit log)."),
) -> None:
    """Serve a consolidation as `champion` and delete the assistants it replaces (registry artifacts and work files)."""
    state.settings.apply_environment()
    from flows.consolidate import release_consolidation

    if not reviewer.strip():
        fail("a release needs the reviewer's name (--reviewer)", 2)
    result = release_consolidation(model_uri=model_uri, home=str(state.settings.home),
                                   profile=state.settings.profile_name, reviewer=reviewer)
    if result["status"] == "refused":
        fail(f"{result['message']} [{result['reason_code']}]", 2)
    out.print(f"{result['model_uri']} is champion (replaces {result['replaces']}); assistants deleted from "
              f"{len(result['versions'])} version(s) and {result['work_adapter_dirs']} work director(ies)")
