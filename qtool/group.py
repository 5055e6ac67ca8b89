"""The command group under every qtool command: it maps each expected error to a one-line
message and an exit code (0 ok, 1 a report threshold failed, 2 bad usage or input, 130
interrupted), never a traceback. Imports nothing heavy: the error classes are looked up
lazily, below numpy-importing modules."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import click

from qtool import interrupted_message
from qtool.console import _fail

EXIT_OK, EXIT_THRESHOLD, EXIT_BAD_INPUT = 0, 1, 2


class _Interrupted(BaseException):
    """A Ctrl-C, carried past click's own handler (which prints an empty line first)."""


class QtoolGroup(click.Group):
    """Maps every expected error to a one-line message and an exit code, never a traceback."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        staging = sys.modules.get("qtool.pipeline.staging")
        if staging is not None:  # a fresh run (tests call main many times in one process)
            staging.PUBLISHED.clear()
        try:
            with warnings.catch_warnings():
                # numpy's floating-point RuntimeWarnings (overflow in a cast, ...) are not for
                # the user: the cases behind them are checked and reported as one-line errors.
                warnings.simplefilter("ignore", RuntimeWarning)
                rv = super().main(args=args, prog_name=prog_name or "qtool",
                                  complete_var=complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            # `qtool` alone: the usage, as --help prints it (not squashed into one error line).
            click.echo(e.ctx.get_help(), err=True)
            sys.exit(EXIT_BAD_INPUT)
        except click.exceptions.UsageError as e:
            _fail(e.format_message())
            sys.exit(EXIT_BAD_INPUT)
        except click.exceptions.Abort:
            _fail("aborted")
            sys.exit(130)
        except (KeyboardInterrupt, _Interrupted):
            # The pipelines have discarded their temporary output by the time it gets here;
            # a Ctrl-C after the commit leaves the complete output, and says so.
            _fail(interrupted_message())
            sys.exit(130)
        except BrokenPipeError:
            # The reader of stdout went away (e.g. `| head`): not an error of ours.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_OK)
        except Exception as e:
            if _is_input_error(e):
                _fail(str(e))
                sys.exit(EXIT_BAD_INPUT)
            raise
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)

    # click catches a KeyboardInterrupt in parsing and in the command, prints an empty line
    # (to close the terminal's ^C echo) and raises Abort; re-raised as _Interrupted, it
    # reaches main() above untouched, so that the one-line message stands alone.
    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise _Interrupted from e

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise _Interrupted from e


def _is_input_error(e: BaseException) -> bool:
    # Imported lazily: the error classes live below numpy-importing modules.
    from qtool.core.schemes import SpecError
    from qtool.formats._common import CheckpointError

    return isinstance(e, CheckpointError | SpecError | OSError | click.ClickException)


