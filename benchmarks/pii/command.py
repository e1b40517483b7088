"""`expunge benchmark pii` / `python -m benchmarks.pii`: a run's settings from a preset, a YAML file and a few flags."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer  # torch and the ML stack are imported lazily: `expunge --help` imports this module

from .options import SMOLLM2_DIR, PIIBenchOptions, preset_options, smoke_options


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def command_options(preset: str, config: Path | None, smoke: bool, flags: dict[str, Any]) -> PIIBenchOptions:
    """The preset (or the smoke configuration), the YAML file on top, then the flags given."""
    from ..run_config import load_options

    if smoke and preset != "scratch":
        raise ValueError("--smoke is its own configuration; drop --preset")
    defaults = smoke_options() if smoke else preset_options(preset)
    return load_options(defaults, config, {name: value for name, value in flags.items() if value is not None})


def pii_command(
    config: Optional[Path] = typer.Option(None, "--config", exists=True, dir_okay=False,
                                          help="YAML file of settings on top of the preset (nested `uld:` section "
                                          "= the pipeline's ULDConfig), e.g. benchmarks/results/pii_runs/forget5.yaml"),
    preset: str = typer.Option("scratch", help="starting configuration, each a committed report's: scratch (a small "
                               "Llama trained from scratch) | smollm2 (SmolLM2-135M-Instruct fine-tuned, exported "
                               "on first use; benchmarks/results/pii_smollm2/)"),
    splits: Optional[str] = typer.Option(None, help="comma-separated UnlearnPII splits: forget1, forget5, forget10"),
    methods: Optional[str] = typer.Option(None, help="comma-separated methods: uld, ga, npo"),
    smoke: bool = typer.Option(False, help="tiny model, forget1 only (the test-suite configuration)"),
    data_dir: Optional[Path] = typer.Option(None, help="UnlearnPII files (default ../shared/datasets/unlearn_pii)"),
    out_dir: Optional[Path] = typer.Option(None, help="where pii.json, pii.md and pii.yaml go (default: the "
                                           "preset's report folder)"),
) -> None:
    """UnlearnPII: train a small base on the people, erase forget1/forget5 with ULD/GA/NPO, measure PII leakage."""
    from . import run
    from .data import data_available

    flags = {"splits": _csv(splits) if splits is not None else None,
             "methods": _csv(methods) if methods is not None else None, "data_dir": data_dir, "out_dir": out_dir}
    try:
        options = command_options(preset, config, smoke, flags)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if not data_available(options.data_dir):
        typer.echo(f"error: UnlearnPII data not found under {options.data_dir}", err=True)
        raise typer.Exit(2)
    try:
        needs_smollm2 = options.pretrained == SMOLLM2_DIR or (options.writes_question_wordings
                                                              and not options.paraphraser)
        if needs_smollm2 and not Path(SMOLLM2_DIR).is_dir():
            from expunge_ml.smollm2 import export_smollm2

            typer.echo(f"exporting SmolLM2-135M-Instruct to {SMOLLM2_DIR} (first use)", err=True)
            export_smollm2(Path(SMOLLM2_DIR))
        run.main(options)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


pii_app = typer.Typer(add_completion=False, help="UnlearnPII benchmark")
pii_app.command("pii")(pii_command)
