"""Opening untrusted files: never blocking (FIFOs, devices), never following a symlink inside
an artifact, never reading more than a cap, and naming what a file is when it is a model file
of another format rather than what qtool reads."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from qtool.formats._common import CheckpointError

_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)

WHAT_QTOOL_READS = ("qtool reads .safetensors files, a *.safetensors.index.json, "
                    "or a directory holding one")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, *, in_dir: Path | None = None,
                 error: type[Exception] = CheckpointError, what: str | None = None) -> int:
    """A read-only descriptor of the regular file ``path``, opened without blocking.

    With ``in_dir`` (an artifact's directory) ``path.name`` is opened relative to that
    directory with O_NOFOLLOW: a symlink inside an artifact is refused, never followed.
    Anything but a regular file (FIFO, device, directory) is refused before any byte is read.
    """
    try:
        if in_dir is None:
            fd = os.open(path, _READ_FLAGS)
        elif os.open in os.supports_dir_fd:
            dfd = os.open(in_dir, _DIR_FLAGS)
            try:
                fd = os.open(path.name, _READ_FLAGS | _NOFOLLOW, dir_fd=dfd)
            finally:
                os.close(dfd)
        else:
            fd = os.open(in_dir / path.name, _READ_FLAGS | _NOFOLLOW)
    except OSError as exc:
        if in_dir is not None and exc.errno in (errno.ELOOP, errno.EMLINK):
            raise error(f"{path}: is a symbolic link; the files of an artifact must be "
                        "regular files inside it") from None
        if what is not None:
            raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
        raise error(f"{path}: cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: {_kind(st.st_mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def stat_in(root: Path, name: str) -> os.stat_result | None:
    """lstat of ``root/name`` (the link itself, never its target); None when it is absent."""
    try:
        return os.stat(root / name, follow_symlinks=False)
    except FileNotFoundError:
        return None


def regular_problem(root: Path, name: str) -> str | None:
    """Why ``root/name`` is not a regular file of the artifact (missing, symlink, FIFO...)."""
    st = stat_in(root, name)
    if st is None:
        return "missing (the manifest lists it)"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link; the files of an artifact must be regular files inside it"
    if not stat.S_ISREG(st.st_mode):
        return f"{_kind(st.st_mode)}, not a regular file"
    return None


def read_capped(path: Path, limit: int, what: str, *, in_dir: Path | None = None,
                error: type[Exception] = CheckpointError) -> bytes:
    """The whole regular file, refused (naming ``what``) when it is over ``limit`` bytes;
    never more than ``limit + 1`` bytes are read, whatever the file grows to meanwhile."""
    fd = open_regular(path, in_dir=in_dir, error=error, what=what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"{path}: {what} is {size} bytes, over the {limit}-byte limit")
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            try:
                chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            except OSError as exc:
                raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise error(f"{path}: {what} grew over the {limit}-byte limit while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def sniff(head: bytes, name: str = "") -> str | None:
    """What a file is, from its first bytes, when it is a common model or data format that is
    not safetensors (GGUF, PyTorch zip or pickle, ONNX, NumPy, HDF5, a JSON config)."""
    lower = name.lower()
    if head.startswith(b"GGUF"):
        return "a GGUF file (llama.cpp)"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        if b"data.pkl" in head or b".pkl" in head or b"/data/" in head:
            return "a PyTorch checkpoint (a zip of pickles, written by torch.save)"
        if lower.endswith(".npz") or b".npy" in head:
            return "a NumPy .npz archive"
        return "a zip archive"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle (a legacy PyTorch checkpoint?)"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "an HDF5 file (Keras/TensorFlow .h5)"
    if lower.endswith(".onnx") or (len(head) >= 3 and head[0] == 0x08 and head[1] < 0x20
                                   and head[2] in (0x12, 0x1A, 0x22, 0x2A, 0x3A)):
        return "an ONNX model"
    text = head.lstrip()
    if text.startswith(b"{"):
        if b'"model_type"' in head or b'"architectures"' in head or lower == "config.json":
            return "a model configuration (config.json), which holds no weights"
        return "a JSON file"
    return None


def not_this_format(path: Path, kind: str) -> str:
    """The one-line message for a file recognised as ``kind``."""
    hint = ""
    if "PyTorch" in kind or "pickle" in kind:
        hint = " (convert it with safetensors.torch.save_file)"
    return f"{path}: this is {kind}, not a safetensors file{hint}; {WHAT_QTOOL_READS}"
