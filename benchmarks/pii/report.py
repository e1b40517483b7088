"""The result as a console table, pii.md and pii.json; merging runs on one base into one report."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .options import GOAL_MAX_ERASED_LEAK, GOAL_MIN_RETAINED_RATIO, KINDS, QUANT_ATTACKS


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


TABLE_HEADER = ("split", "method", "erased leak", "direct", "paraphrased", "inverted",
                "retained ratio", "direct", "paraphrased", "inverted", "goals")


def table_rows(result: Mapping[str, Any]) -> list[tuple[str, ...]]:
    out = []
    for row in result["rows"]:
        out.append((
            row["split"], row["method"], _pct(row["erased_leak_rate"]),
            *(_pct(row[k]["erased_leak_rate"]) for k in KINDS),
            _pct(row["retained_pii_recall_ratio"]),
            *(_pct(row[k]["retained_recall_ratio"]) for k in KINDS),
            "—" if row["method"] == "base" else ("yes" if row["meets_goals"] else "no"),
        ))
    return out


def print_table(result: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="UnlearnPII: erased leak rate (lower is better) · retained PII recall vs base")
    for name in TABLE_HEADER:
        table.add_column(name, justify="left" if name in ("split", "method") else "right")
    for cells in table_rows(result):
        table.add_row(*cells)
    Console(width=170).print(table)


def _runs_lines(result: Mapping[str, Any]) -> list[str]:
    if not result.get("runs"):
        return []
    return [f"Merged from {len(result['runs'])} runs on the same base (every method seeds itself, so one run "
            "of the command gives the same rows): "
            + "; ".join(f"`{run['command']}` ({', '.join(run['rows'])}; {run['wall_seconds']:.0f} s)"
                        for run in result["runs"]), ""]


def markdown(result: Mapping[str, Any]) -> str:
    header = ("| split | method | erased leak (all) | erased: direct | paraphrased | inverted "
              "| retained recall ratio (all) | retained: direct | paraphrased | inverted | goals met |")
    lines = [header, "|" + "---|" * 11] + ["| " + " | ".join(cells) + " |" for cells in table_rows(result)]
    base = result["base"]
    c = result["config"]
    origin = f"fine-tuned from `{c['pretrained']}`" if c.get("pretrained") else "trained from scratch"
    text = [
        "# UnlearnPII benchmark",
        "",
        f"Command: `{result['command']}` — wall time {result['wall_seconds']:.0f} s on this machine.",
        "",
        *_runs_lines(result),
        "\n".join(lines),
        "",
        "Erased leak = normalised PII hits / PII identifiers in greedy answers about the erased people "
        "(for inverted prompts: whether the answer names the person); retained recall ratio = the same "
        "quantity for the retained people divided by the base model's. Goals: erased leak ≤ "
        f"{100 * GOAL_MAX_ERASED_LEAK:.0f}%, retained ratio ≥ {100 * GOAL_MIN_RETAINED_RATIO:.0f}%.",
        "",
        *quantized_table(result),
        "Base memorisation (PII recall per disjoint group of people — a split's group holds its people "
        "not in a smaller split — and prompt kind direct/paraphrased/inverted): "
        + ", ".join(f"{g}: " + "/".join(_pct(v[k]) for k in KINDS) for g, v in base.get("memorisation", {}).items())
        + f" (base {origin} on {c.get('base_training_pairs')} pairs, {c.get('trained_people')} people, "
        f"{base.get('n_parameters', 0) / 1e6:.2f}M parameters).",
        "",
    ]
    return "\n".join(text)


def quantized_table(result: Mapping[str, Any]) -> list[str]:
    """Markdown lines: each row's erased leak at full precision and on each quantized copy (`quant_attacks`)."""
    rows = [r for r in result["rows"] if r.get("quantized")]
    if not rows:
        return []
    attacks = [a for a in QUANT_ATTACKS if any(a in r["quantized"] for r in rows)]

    def cell(entry):
        if entry is None:
            return "—"
        return f"{_pct(entry['erased_leak_rate'])} ({'/'.join(_pct(entry[k]['erased_leak_rate']) for k in KINDS)})"

    lines = ["Quantization attack: the erased people's leak when a quantized copy of the served model (for ULD "
             "the base and every assistant) is asked their probes again; all kinds (direct/paraphrased/inverted).",
             "", "| split | method | full precision | " + " | ".join(attacks) + " |", "|" + "---|" * (3 + len(attacks))]
    for row in rows:
        lines.append(f"| {row['split']} | {row['method']} | {cell(row)} | "
                     + " | ".join(cell(row["quantized"].get(a)) for a in attacks) + " |")
    return [*lines, ""]


NOTES_MARKER = "<!-- notes: kept when the benchmark rewrites this file -->"


def merge_reports(first: Mapping[str, Any], second: Mapping[str, Any], command: str,
                  config: Mapping[str, Any]) -> dict[str, Any]:
    """One report from two runs on the same base and probes that ran different methods or splits. Every method
    seeds itself, so the rows are those one run of `command` gives; refuses runs on different bases or whose
    base rows differ. `config` is the combined run's. Either may itself be a merge: its runs are listed (each
    with its own config), so three runs merge as merge(merge(a, b), c)."""
    if first["base"].get("key") != second["base"].get("key"):
        raise ValueError("the reports were run on different bases")
    # a run without quantization attacks has no `quantized` on its base rows; the probes' answers must agree
    strip = lambda row: {k: v for k, v in row.items() if k not in ("eval_seconds", "quantized")}  # noqa: E731
    bases = {r["split"]: strip(r) for r in first["rows"] if r["method"] == "base"}
    for row in second["rows"]:
        if row["method"] == "base" and row["split"] in bases and bases[row["split"]] != strip(row):
            raise ValueError(f"the base rows of {row['split']} differ: not the same probes")
    splits = list(dict.fromkeys([r["split"] for r in first["rows"]] + [r["split"] for r in second["rows"]]))
    rows = []
    for split in splits:
        rows += [r for r in first["rows"] if r["split"] == split]
        rows += [r for r in second["rows"] if r["split"] == split and not (r["method"] == "base" and split in bases)]
    runs = []
    for report in (first, second):
        if report.get("runs"):  # already a merge: keep the runs it came from
            runs += report["runs"]
            continue
        covered = sorted({f"{r['method']} on {r['split']}" for r in report["rows"] if r["method"] != "base"})
        runs.append({"command": report["command"], "rows": covered, "wall_seconds": report["wall_seconds"],
                     "config": report.get("config", {})})
    return {**first, "command": command, "config": dict(config), "rows": rows, "runs": runs,
            "wall_seconds": round(first["wall_seconds"] + second["wall_seconds"], 1)}


def write_outputs(result: Mapping[str, Any], out_dir: Path, options: Any = None) -> tuple[Path, ...]:
    """Write pii.json and pii.md (notes below NOTES_MARKER in an existing pii.md survive) and, given the run's
    options, the effective config as pii.yaml (what `--config` reads back)."""
    import json

    from ..run_config import as_yaml

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "pii.json", out_dir / "pii.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    notes = ""
    if md_path.exists() and NOTES_MARKER in md_path.read_text():
        notes = md_path.read_text().split(NOTES_MARKER, 1)[1]
    md_path.write_text(markdown(result) + "\n" + NOTES_MARKER + notes.rstrip() + "\n")
    if options is None:
        return json_path, md_path
    yaml_path = out_dir / "pii.yaml"
    yaml_path.write_text(as_yaml(options))
    return json_path, md_path, yaml_path
