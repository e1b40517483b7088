"""What every benchmark command shares: its settings from defaults + `--config` + flags, and its own command line."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import typer

CONFIG_HELP = "YAML file of settings that differ from the defaults (nested sections such as `uld:` merge)"


def invoked_command(subcommand: str) -> str:
    """The command line that started benchmark `subcommand`, copy-pasteable for the report."""
    prefix = "expunge benchmark" if Path(sys.argv[0]).name == "expunge" else "python -m benchmarks.cli"
    args = sys.argv[sys.argv.index(subcommand):] if subcommand in sys.argv else [subcommand]
    return prefix + " " + " ".join(shlex.quote(a) for a in args)


def load_or_exit(defaults: Any, config: Optional[Path], overrides: dict[str, Any]) -> Any:
    """The options: defaults, then the YAML file, then the flags given (None: not given); a bad file exits
    with one line."""
    from .run_config import load_options

    try:
        return load_options(defaults, config, {k: v for k, v in overrides.items() if v is not None})
    except (OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
