from datetime import datetime, timezone

import pytest

from expunge.requests import RequestError, due_date, parse_request

VALID = """
ticket_id: T-1
type: privacy_erasure
regulation: GDPR
subject: {names: [Ada Example]}
target_model: models:/m@champion
"""


def test_valid_request_parses_with_defaults():
    spec = parse_request(VALID)
    assert spec.ticket_id == "T-1" and spec.method == "uld" and spec.subject.names == ["Ada Example"]


@pytest.mark.parametrize(
    "text, code, fragment",
    [
        ("ticket_id: [unclosed", "malformed_yaml", "line 1"),
        ("- just\n- a list\n", "malformed_yaml", "mapping"),
        (VALID.replace("regulation: GDPR\n", ""), "missing_field", "'regulation'"),
        (VALID.replace("privacy_erasure", "forget_everything"), "unknown_request_type", "forget_everything"),
        (VALID.replace("names: [Ada Example]", "names: []"), "invalid_field", "privacy_erasure needs"),
        (VALID + "colour: blue\n", "unknown_field", "'colour'"),
        (VALID.replace("T-1", "bad id with spaces"), "invalid_field", "ticket_id"),
    ],
)
def test_bad_requests_name_the_problem(text, code, fragment):
    with pytest.raises(RequestError) as info:
        parse_request(text)
    assert info.value.reason_code == code
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_ticket_id_is_kept_when_the_rest_is_invalid():
    with pytest.raises(RequestError) as info:
        parse_request(VALID.replace("regulation: GDPR\n", ""))
    assert info.value.ticket_id == "T-1"


def test_gdpr_due_date_is_one_calendar_month_clamped_to_month_end():
    received = datetime(2026, 1, 31, 12, tzinfo=timezone.utc)
    assert due_date("GDPR", received) == datetime(2026, 2, 28, 12, tzinfo=timezone.utc)
    assert due_date("gdpr", datetime(2026, 12, 15, tzinfo=timezone.utc)).date().isoformat() == "2027-01-15"
    assert (due_date("CCPA", received) - received).days == 45


def test_redacting_the_subject_keeps_its_keyed_hashes():
    from expunge.intake import is_redacted, redact_subject, subject_fingerprints
    from expunge.requests import RequestSpec

    spec = RequestSpec.model_validate({
        "ticket_id": "T-1", "type": "privacy_erasure", "regulation": "GDPR", "target_model": "models:/m@champion",
        "subject": {"names": ["Ada Quill"], "aliases": ["A. Quill"], "identifiers": ["ada@quill.example"]},
    })
    key = b"k" * 32
    redacted = redact_subject(key, spec)
    text = redacted.model_dump_json()
    assert "Quill" not in text and "ada@" not in text and is_redacted(redacted) and not is_redacted(spec)
    assert subject_fingerprints(key, redacted) == subject_fingerprints(key, spec)
    assert redact_subject(key, redacted) == redacted  # idempotent
    # a different key gives different hashes: they identify the subject only to the key holder
    assert subject_fingerprints(b"x" * 32, spec) != subject_fingerprints(key, spec)


def test_a_model_outside_the_registry_gets_versions_under_its_own_name():
    from models_registry.registry import ResolvedTarget
    from tasks.register import registered_name_for, unlearned_name

    assert unlearned_name("/srv/models/SmolLM2-135M-Instruct/") == "SmolLM2-135M-Instruct-unlearned"
    assert unlearned_name("HuggingFaceTB/SmolLM2-135M") == "SmolLM2-135M-unlearned"
    assert unlearned_name("/data/my model (v2)") == "my-model-v2-unlearned"
    local = ResolvedTarget("/srv/models/llama", None, None, "causal_lm", "/srv/models/llama", "/srv/models/llama",
                           None, None, None)
    registered = ResolvedTarget("models:/support-bot@champion", "models:/support-bot/3", "support-bot", "causal_lm",
                                "/x", "models:/support-bot/3", None, None, None)
    assert registered_name_for(None, local) == "llama-unlearned"
    assert registered_name_for(None, registered) == "support-bot"  # a registry model's versions stay under its name
    assert registered_name_for("legal-hold-7", local) == "legal-hold-7"  # the request's own choice wins


def test_overdue_and_due_within_pick_open_tickets_most_urgent_first():
    import pytest

    from expunge.service import due_rows, parse_span

    now = datetime(2026, 12, 5, tzinfo=timezone.utc)
    rows = [{"ticket_id": "A", "status": "received", "due_at": "2026-12-20T00:00:00+00:00"},
            {"ticket_id": "B", "status": "training", "due_at": "2026-12-01T00:00:00+00:00"},
            {"ticket_id": "C", "status": "released", "due_at": "2026-11-01T00:00:00+00:00"},  # done: not listed
            {"ticket_id": "D", "status": "failed_gates", "due_at": "2026-12-08T00:00:00+00:00"}]
    assert [r["ticket_id"] for r in due_rows(rows, overdue=True, within_days=None, now=now)] == ["B"]
    assert [r["ticket_id"] for r in due_rows(rows, False, parse_span("7d"), now=now)] == ["B", "D"]
    assert [r["ticket_id"] for r in due_rows(rows, False, parse_span("36h"), now=now)] == ["B"]
    with pytest.raises(RequestError, match="a span like 7d"):
        parse_span("soon")


def test_a_due_date_is_extended_as_far_as_the_regulation_allows_and_audited(tmp_path):
    from db import requests_repo, session_scope
    from expunge.service import extend_due_date
    from expunge.settings import Settings

    settings = Settings(home=tmp_path, profile_name="tiny")
    received = datetime(2026, 1, 31, tzinfo=timezone.utc)
    with session_scope(settings.db_url) as session:
        for ticket, regulation, status in (("G-1", "GDPR", "received"), ("C-1", "CCPA", "training"),
                                           ("D-1", "DMCA", "received"), ("R-1", "GDPR", "released")):
            request = requests_repo.create_request(
                session, ticket_id=ticket, request_type="privacy_erasure", regulation=regulation, spec={},
                target_model_uri="m", received_at=received, due_at=due_date(regulation, received),
                audit_payload={})
            request.status = status
    first = extend_due_date(settings, "g-1", 1, "many requests this month", "dpo@example.org")
    assert (first["from"].date().isoformat(), first["to"].date().isoformat()) == ("2026-02-28", "2026-03-31")
    second = extend_due_date(settings, "G-1", 1, "still many", "dpo@example.org")
    assert second["to"].date().isoformat() == "2026-04-30" and second["total"] == 2  # 3 months from receipt in all
    ccpa = extend_due_date(settings, "C-1", 45, "complex", "dpo@example.org")
    assert (ccpa["to"] - received).days == 90
    refusals = {("G-1", 1): "extension_exceeded", ("C-1", 1): "extension_exceeded", ("D-1", 1): "no_extension",
                ("R-1", 1): "closed_ticket", ("NONE", 1): "unknown_ticket"}
    for (ticket, amount), code in refusals.items():
        with pytest.raises(RequestError) as refused:
            extend_due_date(settings, ticket, amount, "why", "dpo@example.org")
        assert refused.value.reason_code == code
    with session_scope(settings.db_url) as session:
        events = requests_repo.events_of(session, "G-1", "due_date_extended")
        assert [(e["amount"], e["total"], e["reviewer"]) for e in events] == [(1, 1, "dpo@example.org"),
                                                                               (1, 2, "dpo@example.org")]
        assert "many" not in str(events)  # the reason is kept as a keyed hash only
        assert requests_repo.get_request(session, "G-1").due_at.date().isoformat() == "2026-04-30"


def test_stored_control_characters_print_escaped_in_status(tmp_path):
    """A row stored before intake refused control characters (or by another writer) cannot forge a status line."""
    from typer.testing import CliRunner

    from db import requests_repo, session_scope
    from expunge.cli import app
    from expunge.settings import Settings

    settings = Settings(home=tmp_path, profile_name="tiny")
    with session_scope(settings.db_url) as session:
        requests_repo.create_request(
            session, ticket_id="OLD-1", request_type="privacy_erasure\nFAKE-9  privacy_erasure  released",
            regulation="GDPR\x1b[31m", spec={}, target_model_uri="m", received_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
            due_at=datetime(2026, 2, 1, tzinfo=timezone.utc), status="rejected", reason_code="x",
            reason_detail="bad\rline", audit_payload={})
    runner = CliRunner()
    for args in (["status"], ["status", "OLD-1"]):
        shown = runner.invoke(app, ["--home", str(tmp_path), "--profile", "tiny", *args])
        assert shown.exit_code == 0, shown.output
        assert "\x1b" not in shown.stdout and "\r" not in shown.stdout
        assert not any(line.lstrip("│ ").startswith("FAKE-9") for line in shown.stdout.splitlines())
    assert "\\x1b[31m" in shown.stdout and "bad\\rline" in shown.stdout
