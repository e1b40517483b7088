"""Fuzzed request files: whatever the bytes, `submit` answers with a result and a reason, never a traceback; a
file is either stored (with a status) or not, and nothing unbounded is written."""
from __future__ import annotations

import sqlite3

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from expunge.service import submit
from expunge.settings import Settings

FIELDS = ["ticket_id", "type", "regulation", "subject", "target_model", "method", "corpus", "notes", "extra"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                             max_size=4), max_leaves=12)
requests = st.dictionaries(st.sampled_from(FIELDS), values, max_size=8).map(lambda d: yaml.safe_dump(d).encode())
files = st.one_of(requests, st.binary(max_size=300), st.text(max_size=300).map(str.encode))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=files)
def test_any_request_file_is_stored_or_refused_with_a_reason(tiny_home, tmp_path, content):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(content)
    result = submit(Settings(home=tiny_home, profile_name="tiny"), path)
    assert result.reason_code or result.status in ("received", "needs_review")
    assert result.message and "\n" not in result.message.strip()
    with sqlite3.connect(tiny_home / "audit.db") as db:
        assert db.execute("SELECT max(length(ticket_id)) FROM requests").fetchone()[0] <= 64
