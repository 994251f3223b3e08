"""What the command groups share: exit codes and the errors that carry them, the output (rich
on a terminal, plain lines in a pipe, one JSON document with ``--json``), the server client,
and small argument parsers.

Where the human-readable story goes: stdout normally; with ``--json`` stdout holds only JSON,
so the story (progress bars included) goes to stderr when stderr is a terminal and nowhere
otherwise. Rich (colours, live bars, tables with borders) is used only when that stream is a
terminal; anything else gets plain lines without escape codes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from typing import IO, Any, Self

from pydantic import ValidationError

from dicebox.settings import Settings

# Exit codes (the module docstring of dicebox.cli explains them to users).
EXIT_OK = 0
EXIT_FAILED = 1          # the job or the work failed (or was canceled)
EXIT_USAGE = 2           # bad usage or input: flags, files, names, a 4xx answer
EXIT_UNAVAILABLE = 3     # the server could not be reached or failed (5xx): try again later
EXIT_INTERRUPTED = 130   # Ctrl-C (128 + SIGINT)


class CommandError(Exception):
    """Ends a command with ``message`` on stderr and exit code ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class UsageError(CommandError):
    """Bad flags, files or values (exit 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


class WorkFailed(CommandError):
    """The job or the in-process work failed or was canceled (exit 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_FAILED)


# -- values --------------------------------------------------------------------------------------

def json_safe(value: Any) -> Any:
    """Strict-JSON data: NaN/inf -> None, numpy values and tuples -> Python lists/numbers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def fmt_float(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def fmt_pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def fmt_time(iso: Any) -> str:
    """An ISO timestamp shortened for tables: ``2025-01-31 12:34:56``."""
    if not isinstance(iso, str) or not iso:
        return "-"
    return iso.replace("T", " ")[:19]


def _g(value: Any) -> str:
    """Numbers in genomes to three significant digits (0.00237, 0.218)."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def describe_layer(layer: dict[str, Any]) -> str:
    """One genome layer in a few words: ``conv2d 16 3x3 relu``."""
    kind = layer.get("type", "?")
    if kind == "conv2d":
        kernel = "x".join(str(k) for k in layer.get("kernel", []))
        return f"conv2d {layer.get('filters')} {kernel} {layer.get('activation', '')}".strip()
    if kind == "maxpool2d":
        return "maxpool2d " + "x".join(str(k) for k in layer.get("kernel", []))
    if kind == "dropout":
        return f"dropout {_g(layer.get('rate'))}"
    if kind == "dense":
        return f"dense {layer.get('size')} {layer.get('activation', '')}".strip()
    return json.dumps(layer, separators=(",", ":"))


def describe_genome(genome: dict[str, Any] | None) -> str:
    """``adam 0.001: conv2d 16 3x3 relu -> maxpool2d 2x2 -> dense 64 relu``."""
    if not isinstance(genome, dict):
        return "-"
    optimizer = genome.get("optimizer") or {}
    layers = " -> ".join(describe_layer(layer) for layer in genome.get("layers") or [])
    return f"{optimizer.get('name', '?')} {_g(optimizer.get('learning_rate', '?'))}: {layers or '(no hidden layers)'}"


# -- argument types ------------------------------------------------------------------------------

def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def image_size(text: str) -> tuple[int, int]:
    """``WxH`` (or one number for a square) -> (width, height)."""
    parts = text.lower().split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 28x28, got {text!r}") from None
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT with both at least 1, got {text!r}")
    return numbers[0], numbers[1]


# -- settings and the server ---------------------------------------------------------------------

def load_settings(**flags: Any) -> Settings:
    """Settings from the environment with the given (non-None) flags on top; a bad value
    becomes a UsageError naming the setting."""
    try:
        return Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ())) or "settings"
            lines.append(f"{where}: {err.get('msg')}")
        raise UsageError("; ".join(lines)) from None


def connect(args: argparse.Namespace):
    """A :class:`dicebox.client.Client` for ``--server`` (else DICEBOX_SERVER_URL) with the API
    key from the environment (DICEBOX_API_KEY or API_ACCESS_KEY; never a flag, which ``ps``
    would show)."""
    from dicebox.client import Client

    settings = load_settings(server_url=getattr(args, "server", None))
    try:
        return Client.from_settings(settings)
    except ValueError as exc:
        raise UsageError(f"--server / DICEBOX_SERVER_URL: {exc}") from None


# -- output --------------------------------------------------------------------------------------

def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Output:
    """Where a command writes: the human story (``say``, ``table``, ``progress``) and, with
    ``--json``, the machine-readable result (``result``, ``json_line``)."""

    def __init__(self, json_mode: bool, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> None:
        self.json = json_mode
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        if not json_mode:
            self.human: IO[str] | None = self.stdout
        else:
            self.human = self.stderr if _is_terminal(self.stderr) else None
        self.console = None
        if self.human is not None and _is_terminal(self.human):
            from rich.console import Console

            console = Console(file=self.human, highlight=False)
            if console.is_terminal and not console.is_dumb_terminal:
                self.console = console

    @property
    def rich(self) -> bool:
        """True when the story is drawn with rich (a real terminal)."""
        return self.console is not None

    def say(self, text: str = "", style: str | None = None) -> None:
        """One line of the story (never parsed as markup: names may hold brackets)."""
        if self.console is not None:
            self.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)
        elif self.human is not None:
            print(text, file=self.human, flush=True)

    def error(self, text: str) -> None:
        """A message on stderr, whatever the mode."""
        print(f"dicebox: {text}", file=self.stderr, flush=True)

    def result(self, document: Any) -> None:
        """The command's JSON document on stdout (``--json`` only)."""
        if self.json:
            print(json.dumps(json_safe(document), indent=2, allow_nan=False), file=self.stdout, flush=True)

    def json_line(self, document: Any) -> None:
        """One JSON line on stdout (``--json`` only; for streams such as ``jobs watch``)."""
        if self.json:
            print(json.dumps(json_safe(document), separators=(",", ":"), allow_nan=False),
                  file=self.stdout, flush=True)

    def table(self, columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None,
              right: Sequence[str] = ()) -> None:
        """A table of ``rows``; ``right`` names the columns to right-align (numbers)."""
        rows = [["-" if v is None else str(v) for v in row] for row in rows]
        if self.console is not None:
            from rich import box
            from rich.table import Table

            table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", highlight=False)
            for column in columns:
                table.add_column(column, justify="right" if column in right else "left", overflow="fold")
            for row in rows:
                table.add_row(*row)
            self.console.print(table)
            return
        if self.human is None:
            return
        if title:
            self.say(title)
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(cell.rjust(w) if col in right else cell.ljust(w)
                             for cell, w, col in zip(cells, widths, columns)).rstrip()

        self.say(line(columns))
        for row in rows:
            self.say(line(row))

    def progress(self, description: str, total: float | None, unit: str = "") -> ProgressBar:
        return ProgressBar(self, description, total, unit)


class ProgressBar:
    """A progress bar on a terminal (rich), plain lines elsewhere, nothing when there is no
    human stream. Use as a context manager.

    ``update(completed, status)`` moves the bar (plain: one line ``description: 3/10 status``
    per call, so callers call it once per step worth a line); ``note(text)`` prints a line
    that stays (above the bar on a terminal)."""

    def __init__(self, out: Output, description: str, total: float | None, unit: str) -> None:
        self.out, self.description, self.total, self.unit = out, description, total, unit
        self._progress = None
        self._task = None

    def __enter__(self) -> Self:
        if self.out.console is not None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TextColumn(self.unit),
                                      TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                                      console=self.out.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, status="")
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def update(self, completed: float, status: str = "", total: float | None = None) -> None:
        if total is not None:
            self.total = total
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, total=self.total, status=status)
        elif self.out.human is not None:
            of = f"/{self.total:g}" if self.total is not None else ""
            unit = f" {self.unit}" if self.unit else ""
            self.out.say(f"{self.description}: {completed:g}{of}{unit}" + (f"  {status}" if status else ""))

    def note(self, text: str, style: str | None = None) -> None:
        if self._progress is not None:
            self._progress.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)
        else:
            self.out.say(text)


class HelpFormatter(argparse.HelpFormatter):
    """Wraps each line of a description or epilog as a paragraph, but keeps lines that start
    with a space (examples) exactly as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            lines.append(indent + line if not line.strip() or line.startswith(" ")
                         else super()._fill_text(line, width, indent))
        return "\n".join(lines)


def use_formatter(parser: argparse.ArgumentParser, formatter: type = HelpFormatter) -> None:
    """Give ``parser`` and every sub-command parser under it ``formatter``."""
    parser.formatter_class = formatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                use_formatter(child, formatter)


def add_output_options(parser: argparse.ArgumentParser, server: bool = True) -> None:
    """``--json`` (and ``--server``) on a leaf command. Defaults are SUPPRESS so the same
    options given before the command (``dicebox --json dataset list``) are not overwritten."""
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print machine-readable JSON on stdout (progress goes to stderr, "
                             "and only on a terminal)")
    if server:
        parser.add_argument("--server", metavar="URL", default=argparse.SUPPRESS,
                            help="server URL (default: DICEBOX_SERVER_URL or http://127.0.0.1:8000); "
                                 "the API key comes from DICEBOX_API_KEY")
