"""The `qtool` command's entry point: `qtool --version` is answered before click, numpy or
Rich is imported (python's own start-up is then most of its time); everything else goes to
the Click group in cli.py."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:] in (["--version"], ["-V"]):
        from qtool import __version__

        sys.stdout.write(f"qtool, version {__version__}\n")  # as click's version_option
        return
    try:
        from qtool.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        # A Ctrl-C while click, numpy and the rest load (hundreds of milliseconds on a cold
        # start), before the CLI's own handler is in place: the same one line, no traceback.
        from qtool import interrupted_message

        sys.stderr.write(f"qtool: error: {interrupted_message()}\n")
        sys.exit(130)
