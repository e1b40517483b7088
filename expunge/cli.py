"""`expunge`: the front door for privacy/legal teams, platform engineers and auditors."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import click
import typer
from typer.core import TyperGroup
from rich.table import Table

from expunge.cli_groups import audit_app, consolidation_app, exclusions_app
from expunge.console import err, fail, out, print_gates, state
from expunge.requests import RequestError
from expunge.settings import ProfileError, Settings

app = typer.Typer(
    help="Turn erasure / takedown requests into unlearned, evaluated, registered and audited models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(audit_app, name="audit")
app.add_typer(exclusions_app, name="exclusions")
app.add_typer(consolidation_app, name="consolidation")


class BenchmarkCommands(TyperGroup):
    """`expunge benchmark tofu|pii|subjects|…`: the measured claims come from these commands, not from tests.
    Their modules load when a benchmark command (or its help) is asked for, so the product's own commands start
    without them."""

    _loaded: click.Group | None = None

    def _benchmarks(self) -> click.Group:
        if BenchmarkCommands._loaded is None:
            from benchmarks.cli import benchmark_app

            BenchmarkCommands._loaded = typer.main.get_group(benchmark_app)
        return BenchmarkCommands._loaded

    def list_commands(self, ctx: click.Context) -> list[str]:
        return self._benchmarks().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._benchmarks().get_command(ctx, cmd_name)


app.add_typer(typer.Typer(cls=BenchmarkCommands, no_args_is_help=True), name="benchmark",
              help="Benchmarks of ULD and the baseline unlearning methods (results under benchmarks/results/).")
@app.callback()
def main(
    home: Optional[Path] = typer.Option(None, "--home", envvar="EXPUNGE_HOME", help="State directory (DB, MLflow store, models). Default: ./.expunge"),
    profile: str = typer.Option("demo", "--profile", envvar="EXPUNGE_PROFILE", help="Profile name (demo, smollm2, tiny; auto for your own model) or a YAML path: sizes and hyper-parameters."),
) -> None:
    settings = Settings.from_env(home, profile)
    try:
        settings.profile  # noqa: B018 - validate early, one clear line on error
    except ProfileError as exc:
        fail(str(exc), 2)
    settings.apply_environment()
    state.settings = settings
    _refuse_a_newer_database(settings)


def _refuse_a_newer_database(settings: Settings) -> None:
    """One line, not an Alembic traceback, when a newer expunge migrated this deployment's database."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.db_url)
    if url.get_backend_name() == "sqlite" and not (url.database and Path(url.database).exists()):
        return  # nothing there yet: the first command that needs it creates it
    from db.session import DatabaseTooNew, ensure_database

    try:
        ensure_database(settings.db_url)
    except DatabaseTooNew as exc:
        fail(str(exc), 2)


def _needs_sample_world(command: str) -> None:
    if "world" not in state.settings.profile or "base_model" not in state.settings.profile:
        fail(f"profile {state.settings.profile_name!r} has no sample world to {command}: use --profile demo, "
             "smollm2 or tiny", 2)


@app.command()
def bootstrap(force: bool = typer.Option(False, help="Retrain even if a matching champion exists.")) -> None:
    """Generate the sample world, train the small base model on it and register it as champion."""
    from flows.bootstrap import bootstrap_sample_model

    _needs_sample_world("bootstrap")
    result = bootstrap_sample_model(home=str(state.settings.home), profile=state.settings.profile_name, force=force)
    verb = "reused" if result["reused"] else "registered"
    out.print(f"base model {verb}: {result['model_uri']} (alias champion)")
    out.print(f"sample request: {result['world']['sample_request']}")


@app.command()
def submit(
    request_file: Path = typer.Argument(..., help="Request YAML (ticket_id, type, regulation, subject, target_model)."),
    revise: bool = typer.Option(False, "--revise", help="Correct a rejected (or never processed needs_review) "
                                "ticket of the same id: a new revision, audited; its due date stays."),
) -> None:
    """Validate and store a request; it is then `received` (or `rejected` / `needs_review`, with a reason)."""
    from expunge.service import submit as do_submit

    result = do_submit(state.settings, request_file, revise)
    if result.exit_code:
        fail(result.message, result.exit_code)
    out.print(result.message)


@app.command()
def run(ticket_id: Optional[str] = typer.Argument(None, help="Ticket to process; default: every received request.")) -> None:
    """Run the `process_request` flow (locally) for received requests, and any whose runner's lease ran out."""
    from expunge.service import EXIT_RUN_FAILED, pending_tickets, purge_resting_subjects, run_request

    _take_inbox()
    purged = purge_resting_subjects(state.settings)
    if purged:
        out.print(f"subject purged after the retention period: {', '.join(purged)}")
    tickets = [ticket_id] if ticket_id else pending_tickets(state.settings)
    if not tickets:
        out.print("no received requests to run")
        return
    worst = 0
    for ticket in tickets:
        try:
            summary = run_request(state.settings, ticket)
        except RequestError as exc:
            if ticket_id is None and exc.reason_code in ("held", "not_runnable", "target_busy"):  # another runner got there first
                out.print(f"ticket {ticket}: skipped ({exc})")
                continue
            fail(str(exc), 2)
        except Exception as exc:  # the flow already recorded `failed` in the DB and audit log
            err.print(f"error: ticket {ticket} failed: {type(exc).__name__}: {exc}", markup=False)
            worst = EXIT_RUN_FAILED
            continue
        if summary["status"] == "skipped":  # another runner claimed it first: not this run's failure
            out.print(f"ticket {ticket}: skipped (another runner holds it)")
            continue
        _print_summary(summary)
        if summary["status"] != "completed":
            worst = EXIT_RUN_FAILED
    _deliver_callbacks()
    raise typer.Exit(worst)


@app.command()
def drain() -> None:
    """Run the scheduled job now (`drain_requests`, the drain-requests deployment): every waiting request, the most
    urgent first, requests on one champion forgotten together (the profile's scheduling.batch_max)."""
    from expunge.service import EXIT_RUN_FAILED

    _take_inbox()
    state.settings.apply_environment()
    from flows.drain import drain_requests

    outcomes = drain_requests(home=str(state.settings.home), profile=state.settings.profile_name)
    if not outcomes:
        out.print("no received requests to run")
    for ticket, status in outcomes.items():
        out.print(f"ticket {ticket}: {status}")
    if any(status not in ("completed", "skipped") for status in outcomes.values()):
        raise typer.Exit(EXIT_RUN_FAILED)


def _deliver_callbacks() -> None:
    from expunge.callbacks import deliver_due

    counts = deliver_due(state.settings)
    if any(counts.values()):
        out.print(f"callbacks: {counts['delivered']} delivered, {counts['failed']} to retry, "
                  f"{counts['given_up']} given up")


@app.command()
def callbacks() -> None:
    """Send the status callbacks that are due (retried with backoff; `expunge run` and `serve` send them too)."""
    _deliver_callbacks()


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on; put a TLS proxy in front to expose it."),
    port: int = typer.Option(8787, help="Port to listen on."),
) -> None:
    """Serve the HTTP intake: POST/PUT/GET /v1/requests, signed with the webhook secret (schema: /openapi.json)."""
    import uvicorn

    from expunge.api import create_app

    secret_source = ("EXPUNGE_WEBHOOK_SECRET" if os.environ.get("EXPUNGE_WEBHOOK_SECRET")
                     else str(state.settings.home / "webhook.key"))
    state.settings.webhook_secret()  # created now, so the operator can hand it to the ticketing system
    out.print(f"expunge intake on http://{host}:{port}/v1/requests (schema /openapi.json); requests are signed "
              f"with the secret in {secret_source}")
    uvicorn.run(create_app(state.settings), host=host, port=port, log_level="warning")


def _print_summary(summary: dict) -> None:
    out.print(f"ticket {summary['ticket_id']}: {summary['status']}"
              + (f" [{summary['reason_code']}]" if summary.get("reason_code") else ""))
    for warning in summary.get("warnings", []):
        err.print(f"warning: {warning}", markup=False)
    if "metrics" not in summary:
        return
    base, unlearned = summary["metrics"]["base"], summary["metrics"]["unlearned"]
    table = Table("split", "metric", "before", "after")
    for split in ("forget", "retain"):
        for metric in ("rougeL_recall", "answer_prob", "fact_recall"):
            if base[split].get(metric) is not None:  # fact recall: only where the answers carry facts
                table.add_row(split, metric, f"{base[split][metric]:.3f}", f"{unlearned[split][metric]:.3f}")
    out.print(table)
    print_gates(summary.get("gates", []))
    out.print(f"model: {summary['model_uri']} aliases: {', '.join(summary['aliases']) or 'none'}")
    if summary.get("report"):
        out.print(f"evidence report: {summary['report']}")


def _print_forget_answers(evidence_path: Path) -> None:
    """How the served model answers the erased subject's questions, beyond ROUGE-L: word salad passes every
    leak gate, so show its fluency and the subject's facts found in any of those answers (numbers only)."""
    if not evidence_path.exists():
        return
    evidence = json.loads(evidence_path.read_text())
    anywhere = evidence.get("facts_anywhere")
    if anywhere and anywhere["base"]["n_facts"]:
        after = anywhere["unlearned"]
        out.print(f"subject's facts stated in any forget answer: base {anywhere['base']['stated']} → unlearned "
                  f"{after['stated']} of {after['n_facts']} (other people's facts in the same answers: "
                  f"{after['others']['stated']} of {after['others']['n_facts']})")
    fluency = evidence.get("fluency_forget")
    if fluency:
        before, after = fluency["base"], fluency["unlearned"]
        if "judge_perplexity" in after:
            out.print(f"fluency judge's perplexity of the forget answers: {before['judge_perplexity']:.1f} → "
                      f"{after['judge_perplexity']:.1f} (ratio {after['judge_perplexity'] / before['judge_perplexity']:.2f};"
                      f" word salad scores tens)")
        out.print(f"degenerate forget answers (empty, looping or word salad): {after['degenerate_share']:.0%}")
    general = [evidence["metrics"][name].get("general") for name in ("base", "unlearned")]
    if None not in general:
        out.print(f"general knowledge (questions the pre-trained model answered, n={general[0]['n']}): ROUGE-L "
                  f"{general[0]['rougeL_recall']:.3f} → {general[1]['rougeL_recall']:.3f} "
                  f"(ratio {general[1]['rougeL_recall'] / max(general[0]['rougeL_recall'], 1e-9):.3f})")


def _take_inbox() -> None:
    from expunge.inbox import expire_filed_requests, take_inbox

    for outcome in take_inbox(state.settings):
        out.print(f"inbox {outcome.file}: {outcome.result.message} → {outcome.moved_to}", markup=False)
    expired = expire_filed_requests(state.settings)
    if expired:
        out.print(f"inbox: {len(expired)} filed request file(s) deleted after the retention period")


@app.command()
def inbox() -> None:
    """Submit every request file in <home>/inbox/: each moves to inbox/accepted/ or inbox/rejected/ (with a reason)."""
    from expunge.inbox import inbox_dir

    inbox_dir(state.settings).mkdir(mode=0o700, parents=True, exist_ok=True)
    _take_inbox()


@app.command()
def requeue(
    ticket_id: str = typer.Argument(..., help="A failed or needs_review ticket to process again."),
    reason: str = typer.Option(..., "--reason", help="Why (audited as a keyed hash: it may name the subject)."),
    operator: str = typer.Option(..., "--operator", help="Who requeues it (audited)."),
) -> None:
    """Send a failed or needs_review ticket back to `received`, audited; the next `expunge run` takes it up."""
    from expunge.service import requeue as do_requeue

    try:
        do_requeue(state.settings, ticket_id, reason, operator)
    except RequestError as exc:
        fail(f"{exc} [{exc.reason_code}]", 2)
    out.print(f"ticket {ticket_id}: received again; `expunge run {ticket_id}` processes it")


@app.command()
def extend(
    ticket_id: str = typer.Argument(..., help="An open ticket."),
    by: int = typer.Option(..., "--by", help="How much longer, in the regulation's unit: months (GDPR, at most 2 "
                           "in all) or days (CCPA, at most 45)."),
    reason: str = typer.Option(..., "--reason", help="Why (audited as a keyed hash; tell the requester too)."),
    reviewer: str = typer.Option(..., "--reviewer", help="Who grants it (audited)."),
) -> None:
    """Extend a ticket's due date as its regulation allows (GDPR Art. 12(3), CCPA), audited."""
    from expunge.service import extend_due_date

    try:
        result = extend_due_date(state.settings, ticket_id, by, reason, reviewer)
    except RequestError as exc:
        fail(f"{exc} [{exc.reason_code}]", 2)
    out.print(f"ticket {result['ticket_id']}: due {result['from']:%Y-%m-%d} → {result['to']:%Y-%m-%d} "
              f"({result['total']} of {result['allowed']} {result['unit']} of extension used)")


@app.command()
def rollback(
    model_name: Optional[str] = typer.Argument(None, help="Registered model; default: the profile's sample model."),
    to: Optional[str] = typer.Option(None, "--to", help="Version to serve again (one the champion was built on); "
                                     "default: the champion's parent."),
    reviewer: str = typer.Option(..., "--reviewer", help="Who decides the rollback (audited)."),
    reason: str = typer.Option(..., "--reason", help="Why (audited as a keyed hash: it may name the subject)."),
) -> None:
    """Move `champion` back to an earlier version; each erasure released after it is reopened (due date kept)."""
    from expunge.service import rollback as do_rollback

    name = model_name or state.settings.profile.get("base_model", {}).get("registered_name")
    if not name:
        fail("name the registered model to roll back", 2)
    try:
        result = do_rollback(state.settings, name, reviewer, reason, to)
    except RequestError as exc:
        fail(f"{exc} [{exc.reason_code}]", 2)
    out.print(f"champion: {result['from']} → {result['to']}")
    for ticket in result["reopened"]:
        out.print(f"ticket {ticket}: reopened (its erasure is no longer served; file it again with "
                  f"`expunge submit --revise`)")


def printable(text: str) -> str:
    """`text` with every control or other unprintable character shown escaped: a stored value (written before
    intake refused them, or by another writer) cannot forge a line or recolour the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _printable_row(row: dict) -> dict:
    return {key: printable(value) if isinstance(value, str) else value for key, value in row.items()}


@app.command()
def status(
    ticket_id: Optional[str] = typer.Argument(None, help="One ticket's status history and key numbers."),
    as_json: bool = typer.Option(False, "--json", help="Every request (or the one given) as JSON, for scripts."),
    overdue: bool = typer.Option(False, "--overdue", help="Only open tickets past their due date."),
    due_within: Optional[str] = typer.Option(None, "--due-within", help="Only open tickets due within a span: 7d, 36h."),
) -> None:
    """Show requests: status, reason, due date, model URI, key metrics."""
    from expunge.service import due_rows, parse_span, request_rows

    try:
        rows = request_rows(state.settings, ticket_id)
        if overdue or due_within:
            rows = due_rows(rows, overdue, parse_span(due_within) if due_within else None)
    except RequestError as exc:
        fail(str(exc), 2)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    rows = [_printable_row(row) for row in rows]
    if ticket_id is None:
        table = Table("ticket", "type", "status", "reason", "due", "model")
        for row in rows:
            table.add_row(row["ticket_id"], row["type"], row["status"], row["reason_code"] or "",
                          row["due_at"][:10], row["model_uri"] or "")
        out.print(table)
        return
    row = rows[0]
    out.print(f"ticket {row['ticket_id']} ({row['type']}, {row['regulation']}): {row['status']}"
              + (f" [{row['reason_code']}] {row['reason'] or ''}" if row["reason_code"] else ""))
    out.print(f"received {row['received_at'][:19]}, due {row['due_at'][:10]}, model {row['model_uri'] or '-'}")
    for change in row["history"]:
        out.print(f"  {change['at'][:19]}  {change['from'] or '-'} → {change['to']}"
                  + (f" ({change['reason_code']})" if change["reason_code"] else ""))
    for key, value in sorted((row["metrics"] or {}).items()):
        if key != "gates":
            out.print(f"  {key}: {value}")
    print_gates((row["metrics"] or {}).get("gates", []))


@app.command()
def report(
    ticket_id: str = typer.Argument(..., help="Ticket whose evidence report to write."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Directory to write into (default: the ticket's work dir)."),
) -> None:
    """Write a ticket's evidence report (Markdown + JSON + plots) locally."""
    from expunge.report import render_report

    try:
        paths = render_report(state.settings, ticket_id, out_dir)
    except RequestError as exc:
        fail(str(exc), 2)
    out.print(f"evidence report: {paths['markdown']}")
    for name, path in sorted(paths.items()):
        if name != "markdown":
            out.print(f"  {name}: {path}")


def _release(ticket_id: str, decision: str, reviewer: str, note: str, accept_unsettled: bool = False) -> None:
    from expunge.service import release

    try:
        result = release(state.settings, ticket_id, decision, reviewer, note, accept_unsettled)
    except RequestError as exc:
        fail(f"{exc} [{exc.reason_code}]", 2)
    except Exception as exc:  # noqa: BLE001 - the intent is recorded; the next decision command completes it
        fail(f"ticket {ticket_id}: the decision was interrupted ({type(exc).__name__}); its intent is recorded and "
             f"the next approve/reject of {ticket_id} completes it", 1)
    out.print(f"ticket {ticket_id}: {result['status']} by {result['reviewer']}")
    out.print(f"model: {result['model_uri']} aliases: {', '.join(result['aliases']) or 'none'}"
              + (f" (previous champion {result['previous_champion']} kept as previous-champion)"
                 if result.get("previous_champion") else ""))
    for mate in result.get("batch_mates") or []:
        out.print(f"ticket {mate}: decided with it (the version serves both)")
    for run in result.get("review_runs_resumed") or []:
        out.print(f"the review run {run} waiting in Prefect was resumed with this decision")
    for gate in result.get("unsettled_gates_accepted") or []:
        out.print(f"accepted within noise: {gate['gate']} {gate['value']} vs {gate['threshold']} "
                  f"(90 % interval {gate['interval'][0]:.3f}–{gate['interval'][1]:.3f})")


@app.command()
def approve(
    ticket_id: str = typer.Argument(..., help="A completed ticket (every gate passed)."),
    reviewer: str = typer.Option(..., "--reviewer", help="Who approves (recorded in the audit log and on the version)."),
    note: str = typer.Option("", help="Free-text note; only its keyed hash is recorded."),
    accept_unsettled: bool = typer.Option(
        False, "--accept-unsettled",
        help="Approve although some quantization gates passed with their threshold inside the worst attack's "
             "90 % interval (refused otherwise); the accepted gates are recorded in the audit log."),
) -> None:
    """Release a completed ticket's model version: it becomes `champion` (the old one stays as `previous-champion`)."""
    _release(ticket_id, "approve", reviewer, note, accept_unsettled)


@app.command()
def reject(
    ticket_id: str = typer.Argument(..., help="A completed ticket (every gate passed)."),
    reviewer: str = typer.Option(..., "--reviewer", help="Who declines (recorded in the audit log and on the version)."),
    note: str = typer.Option("", help="Free-text note; only its keyed hash is recorded."),
) -> None:
    """Decline a completed ticket's model version: it loses `challenger` and is never served."""
    _release(ticket_id, "reject", reviewer, note)


@app.command()
def lineage(
    model_uri: str = typer.Argument(..., help="A registered version: models:/NAME@ALIAS or models:/NAME/N."),
    as_json: bool = typer.Option(False, "--json", help="The versions as JSON, for scripts."),
) -> None:
    """Show a model version and every version it was built on: the tickets whose erasures it contains."""
    from expunge.service import model_lineage

    try:
        rows = model_lineage(state.settings, model_uri)
    except RequestError as exc:
        fail(f"{exc} [{exc.reason_code}]", 2)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table("version", "aliases", "tickets", "method", "gates", "release", "erased records", "assistants")
    for row in rows:
        table.add_row(row["uri"], ", ".join(row["aliases"]), ", ".join(row["ticket_ids"]) or "(base)", row["method"] or "",
                      row["gates"] or "", " ".join(v for v in (row["release"], row["reviewer"]) if v),
                      "" if row["erased_records"] is None else str(row["erased_records"]),
                      "" if row["assistants"] is None else str(row["assistants"]))
    out.print(table)


@app.command()
def demo() -> None:
    """Bootstrap the sample model, erase the sample subject end to end, and print the evidence."""
    from expunge.service import request_rows, run_request, submit as do_submit, verify_audit
    from flows.bootstrap import bootstrap_sample_model

    _needs_sample_world("demo")
    started = time.perf_counter()
    settings = state.settings
    boot = bootstrap_sample_model(home=str(settings.home), profile=settings.profile_name)
    out.print(f"[1/4] base model: {boot['model_uri']} ({'reused' if boot['reused'] else 'trained'})")
    result = do_submit(settings, Path(boot["world"]["sample_request"]))
    out.print(f"[2/4] {result.message}")
    if result.exit_code and result.reason_code != "duplicate_ticket":
        fail(result.message, result.exit_code)
    summary = None
    if result.status == "received":
        summary = run_request(settings, result.ticket_id)
        out.print(f"[3/4] flow finished: {summary['status']}")
    row = request_rows(settings, result.ticket_id)[0]
    verification = verify_audit(settings)
    out.print("[4/4] result")
    if summary:
        _print_summary(summary)
    metrics = row["metrics"] or {}
    retain_ratio = metrics.get("unlearned_retain_rougeL", 0) / max(metrics.get("base_retain_rougeL", 0), 1e-9)
    out.print(f"request {row['ticket_id']}: {row['status']}")
    out.print(f"model version: {row['model_uri']}")
    out.print(f"forget ROUGE-L recall: base {metrics.get('base_forget_rougeL')} → unlearned {metrics.get('unlearned_forget_rougeL')}")
    if metrics.get("base_forget_facts") is not None:
        out.print(f"forget fact recall: base {metrics.get('base_forget_facts')} → unlearned {metrics.get('unlearned_forget_facts')}")
    out.print(f"neighbours' (retain) ROUGE-L recall: base {metrics.get('base_retain_rougeL')} → unlearned {metrics.get('unlearned_retain_rougeL')} (ratio {retain_ratio:.3f})")
    _print_forget_answers(settings.ticket_dir(row["ticket_id"]) / "evidence.json")
    out.print(f"audit verify: {'OK' if verification.ok else 'BROKEN'} ({verification.n_events} events, head {verification.head_hash[:16]}…)")
    out.print(f"demo took {time.perf_counter() - started:.0f}s")
    if row["status"] == "completed":
        from expunge_ml.gates import unsettled_gates

        unsettled = [g["gate"] for g in unsettled_gates(metrics.get("gates", []))]
        out.print(f"next: a reviewer releases it with `expunge approve {row['ticket_id']} --reviewer NAME`"
                  + (f" (--accept-unsettled: {', '.join(unsettled)} passed within its interval; read the report)"
                     if unsettled else ""))
    if row["status"] != "completed" or not verification.ok:
        raise typer.Exit(5)


if __name__ == "__main__":
    app()
