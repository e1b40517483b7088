"""The CLI's consoles, its state (the deployment's settings) and how it fails: shared by `expunge.cli` and its
command groups (`expunge.cli_groups`)."""
from __future__ import annotations

import sys

import typer
from rich.console import Console

from expunge.settings import Settings

# No markup: tickets, reasons and paths are data, and "[gate_failed]" must print as written.
# Piped output gets a wide console so tables in logs and scripts are not cut at 80 columns.
_WIDTH = None if sys.stdout.isatty() else 160
out = Console(highlight=False, soft_wrap=True, markup=False, width=_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


class State:
    settings: Settings


state = State()


def fail(message: str, code: int) -> None:
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def print_gates(gates: list[dict]) -> None:
    """Every gate with its verdict; one that could not be evaluated says so and why, never `pass`."""
    for gate in gates:
        mark = f"NOT EVALUATED ({gate['skipped']})" if gate.get("skipped") else ("pass" if gate["passed"] else "FAIL")
        out.print(f"gate {gate['gate']}: {gate['value']} {gate['op']} {gate['threshold']} → {mark}", markup=False)
    unevaluated = [g["gate"] for g in gates if g.get("skipped")]
    if unevaluated:
        err.print(f"warning: {len(unevaluated)} gate(s) not evaluated: {', '.join(unevaluated)}", markup=False)
