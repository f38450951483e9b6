"""What every `shoal` command shares: the Typer app, the consoles, output formats (table, JSON,
YAML), and errors with their exit codes (listed in scheduler/cli/__init__.py)."""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from enum import Enum
from typing import Callable, Iterable, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from scheduler.admission import SubmitError
from scheduler.client import Client, NotRunning, ShoalError
from scheduler.spec import SpecError


app = typer.Typer(help="Shoal: a GPU scheduler for LLM fine-tuning on Ray.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


# Piped output (scripts, grep) gets whole lines instead of rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 250)


err = Console(stderr=True, soft_wrap=True)  # never wrap error lines: they are file:line: field: message


class Output(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


OUTPUT = typer.Option(Output.table, "--output", "-o", help="table, json or yaml")


def _client() -> Client:
    try:
        return Client()
    except NotRunning as e:
        _error(str(e))
        raise typer.Exit(3) from None
    except ShoalError as e:
        raise _fail(e) from None


def _emit(data, output: Output) -> bool:
    """Print `data` (pydantic models, lists of them, dicts) as JSON or YAML and return True;
    False for table output (the caller draws the table)."""
    if output is Output.table:
        return False
    plain = _plain(data)
    if output is Output.json:
        out.out(json.dumps(plain, indent=2), highlight=False)
    else:
        import yaml

        out.out(yaml.safe_dump(plain, sort_keys=False).rstrip("\n"), highlight=False)
    return True


def _plain(data):
    if hasattr(data, "model_dump"):
        return data.model_dump(mode="json")
    if isinstance(data, list):
        return [_plain(x) for x in data]
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    return data


def _table(*columns: str, fold: str | None = None) -> Table:
    t = Table(box=None, header_style="bold")
    for c in columns:
        if c == fold:
            t.add_column(c, overflow="fold", min_width=20)
        else:
            t.add_column(c, no_wrap=True)
    return t


def _fail(e: Exception, code: int = 1) -> typer.Exit:
    if isinstance(e, NotRunning):
        code = 3
    elif isinstance(e, ShoalError) and e.status in (401, 403):
        code = 4
    elif isinstance(e, ShoalError) and e.status in (400, 404, 409, 422):
        code = 2
    elif isinstance(e, (SpecError, SubmitError)):
        code = 2
    if isinstance(e, (SpecError, SubmitError)):
        _error(f"invalid spec ({len(e.problems)} problem(s)):\n" + "\n".join(f"  {p}" for p in e.problems))
    else:
        _error(str(e))
    return typer.Exit(code)


T = TypeVar("T")


def _ask(call: Callable[[], T]) -> T:
    """The result of an API call; a refused or failed call ends the command with its exit code."""
    try:
        return call()
    except ShoalError as e:
        raise _fail(e) from None


def _for_each(ids: Iterable, noun: str, act: Callable[[object], str]) -> None:
    """`act(id)` for every id, printing the message it returns; a refused one is reported and the
    rest still run. Exits with the worst outcome's code."""
    code = 0
    for i in ids:
        try:
            out.print(act(i))
        except ShoalError as e:
            _error(f"{noun} {i}: {e}")
            code = max(code, _fail_code(e))
    raise typer.Exit(code)


def _error(message: str) -> None:
    """'error: ...' on stderr; the message is printed verbatim (no markup, no wrapping)."""
    err.print("[red]error:[/] ", end="")
    err.print(message, markup=False, highlight=False)


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ts(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _when(t: float | None) -> str:
    """A start estimate: 'now', 'in 5m', or a date; '-' when unknown."""
    if t is None:
        return "-"
    dt = t - time.time()
    if dt <= 1:
        return "now"
    if dt < 3600:
        return f"in {dt / 60:.0f}m"
    return _ts(t)


def _fail_code(e: ShoalError) -> int:
    if isinstance(e, NotRunning):
        return 3
    return 4 if e.status in (401, 403) else 2

