"""The `qtool` command's entry point: `qtool --version` is answered before click, numpy or
Rich is imported (python's own start-up is then most of its time); everything else goes to
the Click group in cli.py."""

from __future__ import annotations

import gc
import os
import sys


def main() -> None:
    if sys.argv[1:] in (["--version"], ["-V"]):
        from qtool import __version__

        sys.stdout.write(f"qtool, version {__version__}\n")  # as click's version_option
        return
    # OpenBLAS on one thread, decided before numpy loads it: qtool runs its BLAS calls (the
    # statistics' dot products) on one thread anyway (pipeline/streams.py says why), and
    # the thread pool OpenBLAS otherwise starts with numpy, one spinning thread per core,
    # cost every command 0.03-0.05 s of CPU and, on 2 busy cores, up to 0.06 s of start-up.
    # A value the user set is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        from qtool.cli import main as cli_main

        cli_main()
    except SystemExit:
        # The command is done (its outputs written and closed or discarded, never left to a
        # finalizer). Python's shutdown collects garbage over every object still alive
        # (numpy, Click, Rich and qtool's modules): 0.02-0.03 s of CPU, a tenth of a small
        # run, measured. Frozen, they are skipped; the exit code and output are the same.
        gc.freeze()
        raise
    except KeyboardInterrupt:
        # A Ctrl-C while click, numpy and the rest load (hundreds of milliseconds on a cold
        # start), before the CLI's own handler is in place: the same one line, no traceback.
        from qtool import interrupted_message

        sys.stderr.write(f"qtool: error: {interrupted_message()}\n")
        sys.exit(130)
