"""The terminal side of the CLI: the stderr console, one-line errors, the progress bar and
the path type. Rich is imported only when something is drawn."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.console import Console

    from qtool.pipeline.plan import TensorResult


class _Silent:
    """What --quiet prints through: nothing. Spares importing Rich (~25 ms of startup)."""

    def print(self, *args: Any, **kwargs: Any) -> None:
        pass


def _err_console(quiet: bool = False) -> Console:
    if quiet:
        return _Silent()  # type: ignore[return-value]
    import os

    from rich.console import Console

    # markup=False: paths and tensor names are printed as they are; "o[bold red]k" is not
    # markup, and "[/" in a path must not raise a MarkupError after the work is done.
    if os.environ.get("NO_COLOR"):  # every escape code goes, bold and dim included
        return Console(stderr=True, highlight=False, markup=False, no_color=True,
                       color_system=None)
    return Console(stderr=True, quiet=quiet, highlight=False, markup=False)


def _out_console() -> Console:
    """The stdout console of the tables and charts. NO_COLOR (any value, https://no-color.org)
    removes every escape code, bold and dim included, not only colour: Rich alone keeps
    those styles under NO_COLOR."""
    import os

    from rich.console import Console

    # markup=False: a tensor name or path such as "o[bold red]k" is shown as it is.
    if os.environ.get("NO_COLOR"):
        return Console(highlight=False, markup=False, no_color=True, color_system=None)
    return Console(highlight=False, markup=False)


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _fail(msg: str) -> None:
    """Print a one-line error on stderr (never silenced by --quiet)."""
    click.echo(f"qtool: error: {_one_line(msg)}", err=True)


def _warn(msg: str, quiet: bool = False) -> None:
    """A one-line warning on stderr (silenced by --quiet)."""
    if not quiet:
        click.echo(f"qtool: warning: {_one_line(msg)}", err=True)


class FilePath(click.Path):
    """A filesystem path; ``-`` is refused, since qtool reads and writes files, not streams."""

    def __init__(self, path_type: type = Path) -> None:
        super().__init__(path_type=path_type)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if str(value) == "-":
            self.fail("'-' (standard input/output) is not supported; give a file path",
                      param, ctx)
        return super().convert(value, param, ctx)


def _progress(results: Iterator[TensorResult], total: int, total_bytes: int, label: str,
              show: bool) -> Iterator[TensorResult]:
    """Wrap a result stream in a Rich progress bar on stderr, shown only on a TTY: tensors
    done out of total, bytes per second and time left. The bar, the speed and the time left
    all follow bytes (a checkpoint's tensors differ in size by orders of magnitude, so a
    tensor count says little about time); the tensor count is a text field."""
    if not show:
        yield from results
        return
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.fields[done]}/{task.fields[count]} tensors"),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_err_console(), transient=True) as bar:
        whole = max(total_bytes, 1)
        task = bar.add_task(label, total=whole, done=0, count=total)
        done = done_bytes = 0
        for r in results:
            done += 1
            done_bytes += r.input_bytes
            bar.update(task, completed=min(done_bytes, whole), done=done)
            yield r


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def _echo_pieces(pieces: Iterator[str]) -> None:
    """Write a rendering as it is made, in writes of about 64 kB (not one echo per row, each
    of which flushes; not the whole text at once, which for 200,000 tensors is ~100 MB)."""
    batch: list[str] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= 1 << 16:
            click.echo("".join(batch), nl=False)
            batch, size = [], 0
    click.echo("".join(batch), nl=False)
