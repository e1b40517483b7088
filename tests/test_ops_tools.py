"""Operator and auditor tools on a finished tiny erasure: the exported audit log, the perf benchmark."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from expunge.cli import app


def cli(home, *args: str):
    return CliRunner().invoke(app, ["--home", str(home), "--profile", "tiny", *args])


def test_an_exported_audit_log_is_checked_offline_and_an_edited_copy_fails(tiny_home, completed, tmp_path):
    exported = cli(tiny_home, "audit", "export", "--out", str(tmp_path / "audit.jsonl"))
    assert exported.exit_code == 0, exported.output
    head = exported.stdout.split("head ")[1].split()[0]
    checked = cli(tiny_home, "audit", "verify", "--file", str(tmp_path / "audit.jsonl"), "--expected-head", head)
    assert checked.exit_code == 0 and "audit chain OK" in checked.stdout, checked.output
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert completed["subject"]["names"][0] not in "".join(lines)  # keyed hashes only
    edited = [json.dumps({**row, "payload_json": row["payload_json"].replace('"completed"', '"rejected"')})
              for row in map(json.loads, lines)]
    assert edited != lines
    (tmp_path / "edited.jsonl").write_text("\n".join(edited) + "\n")
    broken = cli(tiny_home, "audit", "verify", "--file", str(tmp_path / "edited.jsonl"))
    assert broken.exit_code == 1 and "hash mismatch" in broken.stderr
    (tmp_path / "short.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # a truncated copy fails against the head
    truncated = cli(tiny_home, "audit", "verify", "--file", str(tmp_path / "short.jsonl"), "--expected-head", head)
    assert truncated.exit_code == 1


def test_the_perf_benchmark_reads_a_finished_ticket_and_writes_its_figures(tiny_home, completed, tmp_path):
    """The figures' shape and bookkeeping, not their values (timings belong to the benchmark's own run)."""
    from benchmarks.perf import PerfOptions, batching_figure, goal_of, run_perf, write_perf

    options = PerfOptions(home=str(tiny_home), profile="tiny", ticket="DEMO-GDPR-0001", repeats=1, new_tokens=2,
                          stacked=(1, 2), training=False, out_dir=str(tmp_path))
    result = run_perf(options, log=lambda line: None)
    values = result["values"]
    assert set(values) == {"P1", "P2_batch1", "P2_batch8", "P3", "P4", "P5", "P6_n1", "P6_n2", "P6_consolidated", "P7"}
    assert values["P4"]["value"] is None and "expunge benchmark batching" in values["P4"]["why"]  # no batching.json
    (tmp_path / "batching.json").write_text(json.dumps({"batch_over_one": 3.5, "command": "expunge benchmark batching",
                                                        "date": "now", "options": {"people": [0, 1], "profile": "tiny"}}))
    assert batching_figure(tmp_path / "batching.json")["value"] == 3.5
    assert (goal_of("P2_batch8"), goal_of("P6_n20"), goal_of("P6_n2")) == (("<=", 1.3), ("<=", 2.0), ("<=", None))
    for key, entry in values.items():
        assert entry["goal"] == goal_of(key)[1]
        if entry["value"] is None:
            assert entry["met"] is None and entry["why"]
        else:
            assert entry["value"] > 0 and entry["met"] in (True, False, None)
    assert 0 < values["P3"]["value"] < 1 and values["P3"]["training_s"] > 0
    assert values["P1"]["value"] is None  # the trainings are the next test's
    json_path, md_path = write_perf(result, tmp_path, "perf")
    assert json.loads(json_path.read_text())["ticket"] == "DEMO-GDPR-0001" and "| P7 |" in md_path.read_text()


def test_the_perf_benchmark_times_uld_and_npo_training_on_the_tickets_erasure(tiny_home, completed, tmp_path):
    """P1's bookkeeping: ULD and NPO each trained once at the profile's settings, not how fast."""
    from benchmarks.perf import PerfOptions, run_perf, train_as_shipped, training_cost, training_ratio, write_perf

    # The benchmark trains each in a fresh process of its own, for its memory figure: here NPO only (ULD in this
    # process), as a fresh process spends most of this test's time importing.
    def train(home, profile, ticket, method):
        return (train_as_shipped if method == "uld" else training_cost)(home, profile, ticket, method)

    p1, trainings = training_ratio(tiny_home, "tiny", "DEMO-GDPR-0001", log=lambda line: None, train=train)
    assert set(trainings) == {"uld", "npo"} and p1["repeats"] == 1
    assert p1["value"] == round(trainings["uld"]["seconds"] / trainings["npo"]["seconds"], 3) > 0
    assert set(trainings["uld"]["parts_s"]) == {"data", "assistants"}  # tiny has no weight selection
    assert set(trainings["npo"]["parts_s"]) == {"unlearn", "save"}
    assert trainings["npo"]["settings"] == {"epochs": 5, "batch_size": 8, "lr": 0.001}  # tiny's baselines
    assert trainings["uld"]["settings"]["n_layers"] == 2 and trainings["uld"]["assistants"] == 1
    for training in trainings.values():
        assert training["steps"] > 0 and training["peak_mem_mb"] >= training["loaded_mem_mb"] > 0
    assert trainings["npo"]["torch_threads"] >= 1 and not trainings["npo"]["target_serves_assistants"]
    result = run_perf(PerfOptions(home=str(tiny_home), profile="tiny", ticket="DEMO-GDPR-0001", repeats=1,
                                  new_tokens=2, stacked=(1,), training=False), log=lambda line: None)
    result["values"]["P1"].update(p1)  # the report's layout with P1 measured
    result["training"] = trainings
    md = write_perf(result, tmp_path, "perf")[1].read_text()
    assert "| uld |" in md and "| npo |" in md and f"| P1 | {p1['value']} |" in md
