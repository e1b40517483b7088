"""`expunge benchmark subjects`: erase each of several sample-world people in turn, under one or more profiles,
and tabulate which promotion gates pass.

`make demo` erases one person; whether a profile's settings pass its gates for the others is a different
question, since a w chosen on one person can fail for most others. Every ticket targets the same
bootstrapped champion (nothing is approved), so the erasures are independent, and every profile must
share the world and base of the first. The output names people by their index in the world's
`people.jsonl`, never by name: gates, served w and status only.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import typer
import yaml

from expunge_ml.gates import FORGET_ANSWER_PERPLEXITY_GATE as JUDGE_GATE, GATES, QUANT_GATE_KEYS

from .command_line import invoked_command, load_or_exit

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
# The profile sections that decide the world and the base: profiles compared on one champion must agree on them.
SHARED_SECTIONS = ("world", "tokenizer", "base_model")


@dataclass(frozen=True)
class SubjectsOptions:
    profiles: tuple[str, ...] = ("demo",)
    people: tuple[int, ...] = tuple(range(6))
    home: Optional[str] = None  # default: a new temporary directory
    out_dir: Optional[str] = str(DEFAULT_OUT_DIR)
    name: str = "subjects"
    # ULD assistant seeds to run each profile with (its `unlearning.uld.seed` replaced); () = the profile's own.
    # Which people pass every gate changes with the assistant's seed, so one seed cannot rank two profiles.
    seeds: tuple[int, ...] = ()


def parse_people(text: str) -> tuple[int, ...]:
    """"0-2,5" → (0, 1, 2, 5): indices into the sample world's people.jsonl."""
    people: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        first, sep, last = item.partition("-")
        try:
            span = range(int(first), int(last) + 1) if sep else [int(first)]
        except ValueError:
            raise ValueError(f"--people {text!r}: {item!r} is not an index or a range like 0-5") from None
        people += [p for p in span if p not in people]
    if not people or min(people) < 0:
        raise ValueError(f"--people {text!r}: give non-negative indices, e.g. 0-5")
    return tuple(people)


def parse_seeds(text: str) -> tuple[int, ...]:
    """"0,1,2" → (0, 1, 2); "" → () (each profile's own seed)."""
    try:
        seeds = tuple(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))
    except ValueError:
        raise ValueError(f"--seeds {text!r}: give integers separated by commas, e.g. 0,1") from None
    if any(seed < 0 for seed in seeds):
        raise ValueError(f"--seeds {text!r}: seeds are non-negative")
    return seeds


def profile_variants(profiles: Sequence[str], seeds: Sequence[int],
                     directory: Path) -> list[tuple[str, str, int | None]]:
    """(label, profile to run, assistant seed or None) for each profile, or for each profile × assistant seed: a copy of the profile with
    `unlearning.uld.seed` set, written to `directory` (the run's private home)."""
    if not seeds:
        return [(profile, profile, None) for profile in profiles]
    from expunge.settings import load_profile

    directory.mkdir(parents=True, exist_ok=True)
    variants = []
    for k, profile in enumerate(profiles):
        for seed in seeds:
            loaded = load_profile(profile)
            loaded.setdefault("unlearning", {}).setdefault("uld", {})["seed"] = seed
            path = directory / f"{k}-{Path(profile).stem}-seed{seed}.yaml"
            path.write_text(yaml.safe_dump(loaded, sort_keys=False))
            variants.append((f"{profile} (seed {seed})", str(path), seed))
    return variants


def settings_digest(profile: str) -> str:
    """8 hex digits naming a profile's settings: a rerun in the same home takes up its own finished tickets, and a
    profile that differs in any setting runs afresh instead of reporting another profile's ticket."""
    import hashlib

    from expunge.settings import load_profile

    return hashlib.sha256(json.dumps(load_profile(profile), sort_keys=True).encode()).hexdigest()[:8]


def check_profiles_share_a_base(profiles: Sequence[str]) -> None:
    """Profiles compared on one champion must build the same world and base (else the first one's is used)."""
    from expunge.settings import load_profile

    first = load_profile(profiles[0])
    for other in profiles[1:]:
        loaded = load_profile(other)
        differ = [s for s in SHARED_SECTIONS if loaded.get(s) != first.get(s)]
        if differ:
            raise ValueError(f"profile {other!r} differs from {profiles[0]!r} in {', '.join(differ)}: profiles compared "
                             "here must share the world and the base model")


def person_request(person: dict[str, Any], ticket_id: str) -> dict[str, Any]:
    """A privacy erasure of one sample-world person, shaped like the demo's own request."""
    return {
        "ticket_id": ticket_id, "type": "privacy_erasure", "regulation": "GDPR",
        "requested_by": "privacy-office@example.org",
        "subject": {"names": [person["name"]], "aliases": list(person["aliases"]),
                    "identifiers": [person["attributes"]["email"]]},
        "target_model": "models:/expunge-sample-llm@champion",
    }


def ticket_row(work: Path, profile: str, index: int, ticket_id: str, status: str) -> dict[str, Any]:
    """What one erasure gave: its gates, the w it served; nothing that names the person."""
    row: dict[str, Any] = {"profile": profile, "person_index": index, "ticket_id": ticket_id, "status": status}
    metrics_path = work / "metrics.json"
    if metrics_path.exists():
        evaluated = json.loads(metrics_path.read_text())
        row["passed"] = bool(evaluated["passed"])
        row["gates"] = {g["gate"]: {"value": g["value"], "threshold": g["threshold"], "passed": g["passed"]}
                        for g in evaluated["gates"]}
    evidence_path = work / "evidence.json"
    if evidence_path.exists():  # each attack's recovery intervals (`expunge_ml.evidence.recovery_interval`)
        evidence = json.loads(evidence_path.read_text())
        attacks = evidence.get("quantization") or {}
        row["quant_intervals"] = {name: {key: attack.get(f"{key}_interval") for key in ("recovery", "fact_recovery")}
                                  for name, attack in attacks.items()}
        # counts only: the subject's facts in any forget answer of the served model, and the other people's there
        anywhere = (evidence.get("facts_anywhere") or {}).get("unlearned")
        if anywhere:
            row["facts_anywhere"] = {"stated": anywhere["stated"], "n_facts": anywhere["n_facts"],
                                     "others_stated": anywhere["others"]["stated"],
                                     "others_n_facts": anywhere["others"]["n_facts"]}
        row.update(headline_numbers(evidence))
    training_path = work / "training.json"
    if training_path.exists():
        weights = json.loads(training_path.read_text()).get("weights")
        if weights:
            row["served_weight"] = round(sum(weights), 6)
    return row


def headline_numbers(evidence: Mapping[str, Any]) -> dict[str, Any]:
    """What the issue of a real base asks of every erasure, from its evidence: the served model's forget ROUGE-L,
    the neighbours' (retained people's) ROUGE-L and the general questions' as ratios of the base's, the share of
    forget answers the fluency check calls degenerate, and the judge's perplexity of the forget answers as a
    ratio of the base's. Read by the gates' own readers (`expunge_ml.gates.GATES`); None where the evidence lacks one."""
    def read(gate: str) -> float | None:
        value = GATES[gate][0](evidence)
        return None if value is None else round(value, 4)

    return {"forget_rougeL": read("max_forget_rougeL"), "neighbour_rougeL_ratio": read("min_retain_rougeL_ratio"),
            "general_ratio": read("min_general_ratio"), "degenerate_share": read("max_degenerate_share"),
            "judge_ppl_ratio": read(JUDGE_GATE)}


def within_goals(row: Mapping[str, Any]) -> bool:
    """A passing erasure that also reads as never having met her: at most 5 % degenerate forget answers, and at
    least 95 % of the base's neighbour and general ROUGE-L."""
    def at_least(key: str, bound: float) -> bool:
        return row.get(key) is not None and row[key] >= bound

    return (row.get("degenerate_share") is not None and row["degenerate_share"] <= 0.05
            and at_least("neighbour_rougeL_ratio", 0.95) and at_least("general_ratio", 0.95))


def failed_within_interval(row: Mapping[str, Any]) -> int:
    """The ticket's failed quantization gates whose threshold lies inside the 90 % interval of every attack over
    it: failures a dozen answers cannot tell from noise (none where the evidence carries no intervals)."""
    count = 0
    for gate, key in QUANT_GATE_KEYS.items():
        result = row.get("gates", {}).get(gate)
        if not result or result["passed"]:
            continue
        over = [iv[key] for iv in (row.get("quant_intervals") or {}).values() if iv.get(key) and iv[key][1] > result["threshold"]]
        count += bool(over) and all(low <= result["threshold"] for low, _ in over)
    return count


# The optional word-salad gate (judge perplexity of the forget answers, unlearned ÷ base) is read apart from the
# shipped gates: the summary counts the tickets passing every other gate, and the ratio's spread.
def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    ratios: dict[str, list[float]] = {}
    for row in rows:
        entry = summary.setdefault(row["profile"], {"tickets": 0, "passed_every_gate": 0, "failed_gates": 0,
                                                    "quant_failures_within_interval": 0})
        entry["tickets"] += 1
        if row.get("error"):  # a run that raised: no gate verdict, and not a "failed" ticket either
            entry["errors"] = entry.get("errors", 0) + 1
        entry["passed_every_gate"] += int(bool(row.get("passed")))
        if row.get("passed") and "degenerate_share" in row:  # the sample world's goals for a released erasure
            entry["passing_within_goals"] = entry.get("passing_within_goals", 0) + within_goals(row)
        entry["failed_gates"] += sum(not g["passed"] for g in row.get("gates", {}).values())
        entry["quant_failures_within_interval"] += failed_within_interval(row)
        if row.get("facts_anywhere"):  # pooled over the tickets: the subjects' facts vs the others' in the same answers
            for key in ("stated", "n_facts", "others_stated", "others_n_facts"):
                entry[f"facts_anywhere_{key}"] = entry.get(f"facts_anywhere_{key}", 0) + row["facts_anywhere"][key]
        judged = (row.get("gates") or {}).get(JUDGE_GATE)
        if judged and judged.get("value") is not None:
            ratios.setdefault(row["profile"], []).append(float(judged["value"]))
            others = [g["passed"] for name, g in row["gates"].items() if name != JUDGE_GATE]
            entry["passed_every_gate_but_the_judges"] = entry.get("passed_every_gate_but_the_judges", 0) + all(others)
            entry["judge_ratio_over_threshold"] = entry.get("judge_ratio_over_threshold", 0) + (not judged["passed"])
    for profile, values in ratios.items():
        summary[profile]["judge_ratio_min_median_max"] = [round(min(values), 4), round(statistics.median(values), 4),
                                                          round(max(values), 4)]
    return summary


def base_description(settings, model_uri: str) -> dict[str, Any]:
    """The champion the erasures ran on: what it was built from, and its parameter count."""
    built = json.loads((settings.models_dir / "sample-base.json").read_text())
    source = settings.profile["base_model"].get("pretrained")
    origin = f"{source} taught the sample world" if source else "a small Llama trained from scratch on the sample world"
    return {"name": f"{model_uri} ({origin})", "parameters": built["n_parameters"]}


def run_subjects(options: SubjectsOptions, log: Callable[[str], None],
                 command: str = "benchmarks.subjects.run_subjects(...)",
                 checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every (profile variant, person) erasure in turn; `checkpoint` gets the result so far after each one, so a
    run stopped half-way keeps the rows it finished."""
    from expunge.service import request_rows, run_request, submit
    from expunge.settings import Settings
    from flows.bootstrap import bootstrap_sample_model

    check_profiles_share_a_base(options.profiles)
    home = Path(options.home or tempfile.mkdtemp(prefix="expunge-subjects-")).resolve()
    started = time.perf_counter()
    settings = Settings(home=home, profile_name=options.profiles[0])
    settings.apply_environment()
    boot = bootstrap_sample_model(home=str(home), profile=options.profiles[0])
    people = [json.loads(line) for line in Path(boot["world"]["people"]).read_text().splitlines()]
    missing = [i for i in options.people if i >= len(people)]
    if missing:
        raise ValueError(f"the sample world has {len(people)} people; no person {missing}")
    requests_dir = home / "subjects_requests"  # the requests name people: they stay in the private home
    requests_dir.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []

    def result_of(finished: list[dict[str, Any]]) -> dict[str, Any]:
        return {"command": command, "options": asdict(options) | {"home": str(home)},
                "base_model_uri": boot["model_uri"], "base": base_description(settings, boot["model_uri"]),
                "seconds": round(time.perf_counter() - started, 1), "rows": finished, "summary": summarise(finished)}

    for label, profile, seed in profile_variants(options.profiles, options.seeds, home / "subjects_profiles"):
        profile_settings = Settings(home=home, profile_name=profile)
        for index in options.people:
            ticket_id = f"SUBJ-{settings_digest(profile)}-{index}"
            path = requests_dir / f"{ticket_id}.json"
            path.write_text(json.dumps(person_request(people[index], ticket_id)))  # JSON is YAML
            submitted = submit(profile_settings, path)
            error = None
            if submitted.status == "received":
                log(f"{label}: person {index} ({ticket_id}) …")
                try:
                    run_request(profile_settings, ticket_id)
                except Exception as exc:  # the flow recorded `failed` in the DB and audit log; go on with the rest
                    # the type only, here and in the rows: a message may quote the record's text (the flow's own
                    # run log and the audit log hold what happened)
                    error = type(exc).__name__
                    log(f"{label}: person {index}: the run failed: {error}")
            status = request_rows(profile_settings, ticket_id)[0]["status"]
            row = ticket_row(profile_settings.ticket_dir(ticket_id), label, index, ticket_id, status)
            if error:
                row["error"] = error
            row["seed"] = seed
            rows.append(row)
            log(f"{label}: person {index}: {status}, w {row.get('served_weight')}")
            if checkpoint:
                checkpoint(result_of(rows))
    return result_of(rows)


HEADLINE_KEYS = ("forget_rougeL", "neighbour_rougeL_ratio", "general_ratio", "degenerate_share", "judge_ppl_ratio")


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_table(result: dict[str, Any]) -> str:
    gate_names = list(dict.fromkeys(g for row in result["rows"] for g in row.get("gates", {})))
    lines = ["| profile | person | status | served w | every gate | " + " | ".join(gate_names) + " |",
             "|" + "---|" * (5 + len(gate_names))]
    for row in result["rows"]:
        gates = row.get("gates", {})
        cells = [("–" if g not in gates else (_cell(gates[g]["value"]) if gates[g]["passed"]
                                               else f"**{_cell(gates[g]['value'])}**")) for g in gate_names]
        status = f"{row['status']}, error: {row['error']}" if row.get("error") else row["status"]
        lines.append(f"| {row['profile']} | {row['person_index']} | {status} | {row.get('served_weight', '–')} | "
                     f"{'pass' if row.get('passed') else 'fail'} | " + " | ".join(cells) + " |")
    if any("forget_rougeL" in row for row in result["rows"]):
        lines += ["", "Headline numbers per erasure: the served model's forget ROUGE-L; the neighbours' (held-out retained "
                  "people's) ROUGE-L, the general questions' and the fluency judge's perplexity of the forget answers, "
                  "each over the base's; the share of forget answers that are empty, looping or word salad.", "",
                  "| profile | person | seed | every gate | forget ROUGE-L | neighbour ratio | general ratio | "
                  "degenerate share | judge ppl ratio |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {row['profile']} | {row['person_index']} | {row.get('seed', '–')} | "
                  f"{'pass' if row.get('passed') else 'fail'} | "
                  + " | ".join(_cell(row.get(key)) for key in HEADLINE_KEYS) + " |" for row in result["rows"]]
    lines += ["", "| profile | tickets | passed every gate | of them within the goals | failed gates | of them "
              "quantization gates within their interval | runs that raised |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {p} | {s['tickets']} | {s['passed_every_gate']} | {s.get('passing_within_goals', '–')} | "
              f"{s['failed_gates']} | {s.get('quant_failures_within_interval', '–')} | {s.get('errors', 0)} |"
              for p, s in result["summary"].items()]
    lines += ["", "Within the goals: degenerate share ≤ 0.05, neighbour and general ratios ≥ 0.95."]
    if any("facts_anywhere_n_facts" in s for s in result["summary"].values()):
        lines += ["", "Facts stated in any answer to the forget questions (served model), pooled over the tickets: the "
                  "erased people's own, and the other people's in the same answers (what word salad states by chance).",
                  "", "| profile | own facts stated | other people's facts stated |", "|---|---|---|"]
        lines += [f"| {p} | {s['facts_anywhere_stated']} of {s['facts_anywhere_n_facts']} | "
                  f"{s['facts_anywhere_others_stated']} of {s['facts_anywhere_others_n_facts']} |"
                  for p, s in result["summary"].items() if "facts_anywhere_n_facts" in s]
    if any("judge_ratio_min_median_max" in s for s in result["summary"].values()):
        lines += ["", f"Word salad (`{JUDGE_GATE}`: the judge's perplexity of the answers to the forget questions, "
                  "unlearned ÷ base), and the tickets that pass every other gate.", "",
                  "| profile | passed every other gate | ratio over its threshold | ratio min / median / max |",
                  "|---|---|---|---|"]
        lines += [f"| {p} | {s['passed_every_gate_but_the_judges']} | {s['judge_ratio_over_threshold']} | "
                  + " / ".join(f"{v:.1f}" for v in s["judge_ratio_min_median_max"]) + " |"
                  for p, s in result["summary"].items() if "judge_ratio_min_median_max" in s]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    md_path.write_text(f"# Gates per erased person\n\nCommand: `{result['command']}` ({result['seconds']} s); "
                       f"base `{result['base_model_uri']}`. Bold: the gate failed.\n\n"
                       + (f"{result['note']}\n\n" if result.get("note") else "") + markdown_table(result))
    return json_path, md_path


def subjects_command(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of settings (profiles, people, seeds, "
                                          "home, out_dir, name) that differ from the defaults"),
    profile: Optional[list[str]] = typer.Option(None, "--profile", help="profile name or YAML path; repeat to "
                                                "compare (all must share the first one's world and base; default demo)"),
    people: Optional[str] = typer.Option(None, help='sample-world people to erase, by index in people.jsonl: "0-5" '
                                         '(the default), "0,3,7"'),
    seeds: Optional[str] = typer.Option(None, help='ULD assistant seeds to run each profile with, e.g. "0,1" (default: '
                                        "the profile's own); the gates of one seed are too noisy to rank two profiles"),
    home: Optional[Path] = typer.Option(None, help="state directory for the runs (default: a new temporary one)"),
    out_dir: Optional[Path] = typer.Option(None, help="where NAME.json and NAME.md go (default benchmarks/results)"),
    name: Optional[str] = typer.Option(None, help="output file stem (default subjects)"),
) -> None:
    """Erase each of several sample-world people in turn under each profile; print and write which gates pass."""
    try:
        flags = {"profiles": tuple(profile) if profile else None, "people": parse_people(people) if people else None,
                 "seeds": parse_seeds(seeds) if seeds is not None else None, "home": str(home) if home else None,
                 "out_dir": str(out_dir) if out_dir else None, "name": name}
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    options = load_or_exit(SubjectsOptions(), config, flags)
    try:
        out_dir = Path(options.out_dir or DEFAULT_OUT_DIR)
        result = run_subjects(options, lambda message: print(message, file=sys.stderr, flush=True),
                              command=invoked_command("subjects"),
                              checkpoint=lambda so_far: write_outputs(so_far, out_dir, options.name))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    print(markdown_table(result))
    paths = write_outputs(result, out_dir, options.name)
    print(f"wrote {paths[0]} and {paths[1]}")
    errors = sum(s.get("errors", 0) for s in result["summary"].values())
    if errors:  # a table of tickets that never ran must not pass for a measurement
        typer.echo(f"error: {errors} of {len(result['rows'])} ticket runs raised an exception (see the log and the "
                   "status column); their rows hold no gate verdict", err=True)
        raise typer.Exit(1)
