"""Atomic publishing: everything is written into a temporary directory beside the target
and renamed into place only after the last byte is written."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path

from qtool.formats._common import CheckpointError
from qtool.formats.manifest import MANIFEST


class OutputError(CheckpointError):
    """The output path cannot be used (exists, is the input, ...)."""



# --------------------------------------------------------------------------- output staging


def _check_output_dir(target: Path, inputs: list[Path], force: bool) -> None:
    resolved = target.resolve()
    for p in inputs:
        rp = p.resolve()
        if rp == resolved or resolved in rp.parents:
            raise OutputError(f"{target}: output would overwrite the input {p}")
    if target.exists():
        if not target.is_dir():
            raise OutputError(f"{target}: exists and is not a directory")
        if any(target.iterdir()):
            if not force:
                raise OutputError(
                    f"{target}: output directory is not empty (use --force to replace an "
                    "earlier qtool artifact)"
                )
            if not (target / MANIFEST).is_file():
                raise OutputError(
                    f"{target}: not a qtool artifact (no {MANIFEST}); --force replaces only those"
                )


class _Staging:
    """A temporary directory beside ``target``, renamed onto it by ``commit``."""

    def __init__(self, target: Path) -> None:
        self.target = target
        parent = target.parent
        # Remember the outermost directory this run creates, so a failure removes it again.
        self.created: Path | None = None
        for p in [parent, *parent.parents]:
            if p.exists():
                break
            self.created = p
        parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.qtool-tmp-", dir=parent))
        # mkdtemp makes the directory 0700; the published artifact gets the usual umask mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)

    def commit_dir(self) -> None:
        old = None
        if self.target.exists() and _exchange(self.tmp, self.target):
            # Swapped in one step: even a SIGKILL right here leaves a complete artifact (the
            # old or the new one) at the target. self.tmp now holds the old one.
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.target.exists():
            # Move the old artifact aside first: at every instant a complete one is in place
            # or nothing is, never a mix.
            old = self.target.with_name(f".{self.target.name}.qtool-old-{os.getpid()}")
            os.rename(self.target, old)
        os.rename(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def commit_file(self, name: str) -> None:
        os.replace(self.tmp / name, self.target)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False where
    the OS or the file system cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
