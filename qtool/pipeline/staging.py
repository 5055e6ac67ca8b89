"""Atomic publishing: everything is written into a temporary directory beside the target
and renamed into place only after the last byte is written."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from qtool.formats._common import CheckpointError
from qtool.formats.manifest import MANIFEST


class OutputError(CheckpointError):
    """The output path cannot be used (exists, is the input, ...)."""


# Targets this process has published (renamed into place), so that a Ctrl-C that lands
# afterwards says the output exists rather than "no output was written".
PUBLISHED: list[Path] = []


# --------------------------------------------------------------------------- output staging

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _check_output_dir(target: Path, inputs: list[Path], force: bool) -> None:
    resolved = target.resolve()
    for p in inputs:
        rp = p.resolve()
        if rp == resolved or resolved in rp.parents:
            raise OutputError(f"{target}: output would overwrite the input {p}")
    if target.is_symlink() or target.exists():
        if target.is_symlink() or not target.is_dir():
            raise OutputError(f"{target}: exists and is not a directory")
        if any(target.iterdir()):
            if not force:
                raise OutputError(
                    f"{target}: output directory is not empty (use --force to replace an "
                    "earlier qtool artifact)"
                )
            problem = artifact_problem(target)
            if problem is not None:
                raise OutputError(f"{target}: {problem}; --force replaces only a complete "
                                  "qtool artifact, and this was left untouched")


def artifact_problem(target: Path) -> str | None:
    """Why the directory ``target`` is not a complete qtool artifact that ``--force`` may
    replace, or None when it is one: its manifest reads, every file it lists is a regular
    file of the recorded size, and the directory holds nothing else (so that replacing it
    deletes nothing the manifest does not vouch for)."""
    from qtool.formats.native import Artifact  # lazily: numpy-free start-up paths
    from qtool.formats.safeio import regular_problem

    if (target / MANIFEST).is_symlink() or not (target / MANIFEST).is_file():
        return f"not a qtool artifact (no {MANIFEST})"
    try:
        art = Artifact.load(target)
    except CheckpointError:
        return f"not a qtool artifact this qtool can read (its {MANIFEST} is not valid)"
    files = art.manifest.files
    for name in sorted(os.listdir(target)):
        if name != MANIFEST and name not in files:
            return f"holds {name!r:.80}, which its {MANIFEST} does not list"
    for name, info in files.items():
        problem = regular_problem(target, name)
        if problem is not None:
            return f"{name!r:.80} {problem.split(' (')[0]}"
        if os.stat(target / name, follow_symlinks=False).st_size != info.get("size"):
            return f"{name!r:.80} does not have the size its {MANIFEST} records"
    return None


def _identity(p: Path) -> tuple[int, int, int] | None:
    """What stands at ``p``: device and inode, and a file's mtime (a file deleted and
    written anew can get the same inode number); None when nothing does."""
    try:
        st = os.stat(p, follow_symlinks=False)
    except FileNotFoundError:
        return None
    # A directory's contents are checked against its manifest instead (its mtime changes
    # whenever an entry does).
    return st.st_dev, st.st_ino, 0 if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns


class _Staging:
    """A temporary directory beside ``target``, renamed onto it by ``commit_dir`` (or one of
    its files onto it by ``commit_file``).

    Publishing never replaces what was not checked: what stands at the target when staging
    starts is remembered (by device and inode). A new target is published with renameat2
    RENAME_NOREPLACE, so a target that another process created meanwhile is an error and
    stays as it is; a replacement (``--force``) is one RENAME_EXCHANGE, after which what came
    back must be what was checked, or it is swapped back. Where renameat2 is missing, a lock
    file beside the target serialises qtool runs instead.
    """

    def __init__(self, target: Path, replace: bool = False,
                 check: Callable[[Path], str | None] | None = None) -> None:
        """``replace``: what stands at the target now may be replaced (``--force``, after
        the caller checked it); otherwise only an empty directory may be. ``check`` says
        why a directory may not be replaced (None when it may); by default
        :func:`artifact_problem`."""
        self.target, self.replace = target, replace
        self.check = check or artifact_problem
        if replace:
            # --force replaces a checked artifact directory or a regular file, nothing else:
            # as root, a device node at OUT (/dev/null) was swapped out and unlinked.
            try:
                mode = os.lstat(target).st_mode
            except FileNotFoundError:
                mode = stat.S_IFREG
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                from qtool.formats.safeio import _kind

                raise OutputError(f"{target}: is {_kind(mode)}, not a regular file; --force "
                                  "replaces only a regular file or a qtool artifact, and this "
                                  "was left untouched")
        parent = target.parent
        # The directories this run creates, innermost first, so a failure removes them again.
        self.created: list[Path] = []
        for p in [parent, *parent.parents]:
            if p.exists():
                break
            self.created.append(p)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.qtool-tmp-", dir=parent))
        except OSError as e:
            self._remove_created()
            raise OutputError(f"{target}: cannot create the output there "
                              f"({e.strerror or e})") from None
        self.before = _identity(target)
        # mkdtemp makes the directory 0700; the published artifact gets the usual umask mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)

    def error(self, exc: OSError) -> OutputError:
        """An OSError met while writing, as a message naming the target the user gave (not
        the temporary name) and what to do."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return OutputError(f"{self.target}: no space left on the device (or over quota) "
                               "while writing; free some space or write elsewhere; nothing "
                               "was written")
        return OutputError(f"{self.target}: cannot write the output ({exc.strerror or exc}); "
                           "nothing was written")

    def _appeared(self) -> OutputError:
        return OutputError(f"{self.target}: was created by another process while qtool was "
                           "writing; it was left untouched and nothing was written")

    def _changed(self) -> OutputError:
        return OutputError(f"{self.target}: was changed by another process while qtool was "
                           "writing; it was left untouched and nothing was written")

    def commit_dir(self) -> None:
        self._publish(self.tmp, is_dir=True)
        PUBLISHED.append(self.target)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit_file(self, name: str) -> None:
        self._publish(self.tmp / name, is_dir=False)
        PUBLISHED.append(self.target)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _publish(self, src: Path, is_dir: bool) -> None:
        now = _identity(self.target)
        if now != self.before:
            raise self._appeared() if self.before is None else self._changed()
        if now is not None and is_dir and not _is_nonempty_dir(self.target):
            # The empty directory that was there is given up (rmdir fails if anything was
            # put into it meanwhile), and the new one is renamed into its place.
            try:
                os.rmdir(self.target)
            except OSError:
                raise self._changed() from None
            now = None
        if now is not None and not self.replace:
            raise self._appeared()
        if now is None:
            done = _renameat2(src, self.target, RENAME_NOREPLACE)
            if done is None:
                with _Lock(self.target):
                    if _identity(self.target) is not None:
                        raise self._appeared()
                    os.rename(src, self.target)
            elif not done:
                raise self._appeared()
            return
        done = _renameat2(src, self.target, RENAME_EXCHANGE)
        if done is None:
            with _Lock(self.target):
                if _identity(self.target) != self.before or (
                        is_dir and self.check(self.target) is not None):
                    raise self._changed()
                self._replace_by_two_renames(src)
            return
        # What came back (now at src) must be what was checked before the run; otherwise the
        # exchange is undone and the run fails.
        if _identity(src) != self.before or src.is_dir() != is_dir or (
                is_dir and self.check(src) is not None):
            _renameat2(src, self.target, RENAME_EXCHANGE)
            raise self._changed()
        if not is_dir:
            os.unlink(src)

    def _replace_by_two_renames(self, src: Path) -> None:
        # Move the old one aside first: at every instant a complete one is in place or
        # nothing is, never a mix.
        old = self.target.with_name(f".{self.target.name}.qtool-old-{os.getpid()}")
        os.rename(self.target, old)
        os.rename(src, self.target)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._remove_created()

    def _remove_created(self) -> None:
        # rmdir, not rmtree: another process may have put something into a directory this
        # run created (another run's output), and that must stay.
        for p in self.created:
            try:
                os.rmdir(p)
            except OSError:
                return


def _is_nonempty_dir(p: Path) -> bool:
    try:
        return any(os.scandir(p))
    except NotADirectoryError:
        return True


class _Lock:
    """``.NAME.qtool-lock`` beside the target, created exclusively: where renameat2 is
    missing, two qtool runs never publish to one target at once."""

    def __init__(self, target: Path) -> None:
        self.path = target.with_name(f".{target.name}.qtool-lock")
        self.target = target

    def __enter__(self) -> _Lock:
        try:
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise OutputError(f"{self.target}: another qtool run is writing it (lock file "
                              f"{self.path}; delete it if none is); nothing was written") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _renameat2(a: Path, b: Path, flags: int) -> bool | None:
    """Linux renameat2: True when done, False when the target exists (RENAME_NOREPLACE),
    None where the OS or the file system cannot (the caller falls back to a lock file)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST or err == errno.ENOTEMPTY:
        return False
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return None
    raise OSError(err, os.strerror(err), str(b))
