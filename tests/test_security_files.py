"""Hostile files, publishing races, hangs and messages (issue 15, first half).

Each failure case runs qtool as a user would (the CLI in-process, or the pipeline API where
a second process is simulated by acting between two steps of a run) and checks the whole
contract: exit 2 (or the OutputError behind it), exactly one ``qtool: error:`` line naming the
file and what is wrong, no traceback, nothing partial left beside the target, and every input
(and whatever another process put at the target) unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import struct
import zipfile
from pathlib import Path

import blake3
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from qtool.formats import writer as writer_mod
from qtool.formats.native import verify
from qtool.pipeline import staging
from qtool.pipeline.dequantize import dequantize_artifact
from qtool.pipeline.plan import QuantizeOptions
from qtool.pipeline.run import quantize_checkpoint
from qtool.pipeline.staging import OutputError
from tests.conftest import run, write_checkpoint
from tests.test_security import assert_one_line_error, leftovers, snapshot


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    return write_checkpoint(d / "model.safetensors")


@pytest.fixture
def art(tmp_path: Path, ckpt: Path) -> Path:
    out = tmp_path / "art"
    run("quantize", ckpt, out, "--scheme", "asymmetric", "-q")
    return out


def _user_dir(p: Path) -> dict[str, tuple[bytes, int]]:
    """A directory of someone else's files at ``p``; returns its snapshot."""
    p.mkdir(parents=True, exist_ok=True)
    (p / "notes.txt").write_text("precious\n")
    (p / "data.bin").write_bytes(os.urandom(64))
    return snapshot(p)


def _fails(tmp_path: Path, args: tuple, *fragments: str, watch: tuple[Path, ...] = ()) -> str:
    """Run, check the one-line exit-2 contract, that nothing temporary is left anywhere under
    tmp_path and that the watched trees did not change."""
    before = {w: snapshot(w) if w.is_dir() else w.read_bytes() for w in watch}
    line = assert_one_line_error(run(*args, expect=2), *fragments)
    for d in [tmp_path, *(p for p in tmp_path.rglob("*") if p.is_dir())]:
        assert leftovers(d) == [], (d, leftovers(d))
    for w, b in before.items():
        assert (snapshot(w) if w.is_dir() else w.read_bytes()) == b, w
    return line


# --------------------------------------------------------------------------------------------
# data loss: --force replaces only a complete artifact checked against its manifest


def _bare_manifest(d: Path) -> None:
    (d / "qtool.json").write_text("{}")


def _artifact_plus_user_file(d: Path, art: Path) -> None:
    os.rename(art, d)
    (d / "thesis.tex").write_text("do not lose me\n")


def _artifact_short_file(d: Path, art: Path) -> None:
    os.rename(art, d)
    with open(d / "model.scale.safetensors", "ab") as f:
        f.write(b"x")


def _artifact_symlinked_file(d: Path, art: Path) -> None:
    os.rename(art, d)
    outside = d.parent / "elsewhere.safetensors"
    os.rename(d / "model.safetensors", outside)
    (d / "model.safetensors").symlink_to(outside)


@pytest.mark.parametrize("make, fragment", [
    (lambda d, a: (_user_dir(d), _bare_manifest(d)), "not a qtool artifact this qtool can read"),
    (lambda d, a: (_user_dir(d), (d / "qtool.json").mkdir()), "not a qtool artifact (no"),
    (_artifact_plus_user_file, "holds 'thesis.tex', which its qtool.json does not list"),
    (_artifact_short_file, "'model.scale.safetensors' does not have the size"),
    (_artifact_symlinked_file, "'model.safetensors' is a symbolic link"),
], ids=["only_qtool_json", "qtool_json_dir", "extra_user_file", "wrong_size", "symlinked"])
def test_force_replaces_only_a_checked_artifact(tmp_path, ckpt, art, make, fragment):
    target = tmp_path / "target"
    make(target, art)
    _fails(tmp_path, ("quantize", ckpt, target, "--force", "-q"), f"{target}: {fragment}",
           "--force replaces only a complete qtool artifact", watch=(target, ckpt.parent))


def test_force_replaces_a_complete_artifact(tmp_path, ckpt, art):
    run("quantize", ckpt, art, "--force", "--scheme", "symmetric", "-q")
    schemes = {t.get("scheme") for t in json.loads((art / "qtool.json").read_text())["tensors"]}
    assert schemes == {None, "symmetric"}  # None: the tensors kept in float
    assert verify(art) == [] and leftovers(tmp_path) == []


def _special(kind: str, p: Path) -> str:
    """Something at ``p`` that is not a regular file; what qtool calls it."""
    if kind == "fifo":
        os.mkfifo(p)
        return "a FIFO"
    if kind == "symlink":
        p.symlink_to(p.parent / "elsewhere.safetensors")
        (p.parent / "elsewhere.safetensors").write_bytes(b"the user's file")
        return "a symbolic link"
    if kind == "socket":
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
        return "a socket"
    os.mknod(p, 0o644 | stat.S_IFCHR, os.makedev(1, 3))  # another /dev/null
    return "a character device"


@pytest.mark.parametrize("kind", ["fifo", "symlink", "socket",
                                  *(["chardev"] if os.geteuid() == 0 else [])])
def test_dequantize_force_replaces_only_a_regular_file(tmp_path, art, kind):
    """`dequantize ART /dev/null --force`, run as root, swapped the device node out and
    unlinked it (RENAME_EXCHANGE does not care what it exchanges)."""
    d = tmp_path / "outs"
    d.mkdir()
    target = d / "r.safetensors"
    what = _special(kind, target)
    before = os.lstat(target)
    _fails(tmp_path, ("dequantize", art, target, "--force"),
           f"{target}: is {what}, not a regular file; --force replaces only a regular file or "
           "a qtool artifact, and this was left untouched")
    after = os.lstat(target)
    assert (after.st_ino, after.st_mode, after.st_rdev) == \
        (before.st_ino, before.st_mode, before.st_rdev)
    if kind == "symlink":
        assert (d / "elsewhere.safetensors").read_bytes() == b"the user's file"


# --------------------------------------------------------------------------------------------
# publishing never replaces what it did not check


def _started(src: Path, out: Path, force: bool = False):
    """A quantize run that has done its checks and written its first tensor."""
    it = iter(quantize_checkpoint(src, out, QuantizeOptions(force=force)))
    next(it)
    return it


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "lock_file"])
def test_target_created_meanwhile_is_not_replaced(tmp_path, ckpt, monkeypatch, fallback):
    if fallback:  # a platform without renameat2: the lock-file path
        monkeypatch.setattr(staging, "_renameat2", lambda a, b, flags: None)
    out = tmp_path / "out"
    it = _started(ckpt, out)
    theirs = _user_dir(out)
    with pytest.raises(OutputError, match="was created by another process while qtool was "
                       "writing; it was left untouched and nothing was written"):
        list(it)
    assert snapshot(out) == theirs and leftovers(tmp_path) == []


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "lock_file"])
def test_two_runs_into_one_new_target_one_wins(tmp_path, ckpt, monkeypatch, fallback):
    if fallback:
        monkeypatch.setattr(staging, "_renameat2", lambda a, b, flags: None)
    out = tmp_path / "out"
    first, second = _started(ckpt, out), _started(ckpt, out)
    list(second)  # the later-started run finishes first and wins
    winner = snapshot(out)
    with pytest.raises(OutputError, match="was created by another process"):
        list(first)
    assert snapshot(out) == winner and verify(out) == [] and leftovers(tmp_path) == []


def test_forced_target_swapped_meanwhile_is_swapped_back(tmp_path, ckpt, art):
    it = _started(ckpt, art, force=True)
    os.rename(art, tmp_path / "moved")
    theirs = _user_dir(art)
    with pytest.raises(OutputError, match="was changed by another process"):
        list(it)
    assert snapshot(art) == theirs and verify(tmp_path / "moved") == []
    assert leftovers(tmp_path) == []


def test_stale_lock_file_is_named(tmp_path, ckpt, monkeypatch):
    monkeypatch.setattr(staging, "_renameat2", lambda a, b, flags: None)
    lock = tmp_path / ".out.qtool-lock"
    lock.write_text("")
    assert_one_line_error(run("quantize", ckpt, tmp_path / "out", "-q", expect=2),
                          "another qtool run is writing it", str(lock))
    # Not ours to remove: only the lock stays, no output and no temporary directory.
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == [lock.name]


def test_dequantize_file_created_meanwhile_is_kept(tmp_path, art):
    out = tmp_path / "restored.safetensors"
    it = iter(dequantize_artifact(art, out))
    next(it)
    out.write_bytes(b"the user's original checkpoint")
    with pytest.raises(OutputError, match="was created by another process"):
        list(it)
    assert out.read_bytes() == b"the user's original checkpoint" and leftovers(tmp_path) == []


def test_dequantize_force_file_replaced_meanwhile_is_kept(tmp_path, art):
    out = tmp_path / "restored.safetensors"
    out.write_bytes(b"old")
    it = iter(dequantize_artifact(art, out, force=True))
    next(it)
    out.unlink()
    out.write_bytes(b"new, written by someone else")
    with pytest.raises(OutputError, match="was changed by another process"):
        list(it)
    assert out.read_bytes() == b"new, written by someone else" and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# an artifact that cannot be restored is not written


F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("dtype, top, scheme", [
    (np.float32, F32_MAX, "symmetric"),
    (np.float32, F32_MAX, "asymmetric"),
    (np.float16, 65504.0, "asymmetric"),
    (ml_dtypes.bfloat16, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), "asymmetric"),
], ids=["f32_sym", "f32_asym", "f16_asym", "bf16_asym"])
def test_unrestorable_tensor_is_refused_by_name(tmp_path, dtype, top, scheme):
    src = tmp_path / "in" / "m.safetensors"
    src.parent.mkdir()
    w = np.array([[top, -top, 1.0, 0.5]] * 4, dtype=np.float64).astype(dtype)
    write_checkpoint(src, {"big.weight": w})
    _fails(tmp_path, ("quantize", src, tmp_path / "out", "--scheme", scheme, "-q"),
           f"{src}: tensor 'big.weight' holds values so close to the largest",
           "restoration would overflow to inf; keep it in float with --skip",
           watch=(src.parent,))
    assert not (tmp_path / "out").exists()
    # The dry run says what quantize would do (it crashed on the infinite error before).
    doc = json.loads(run("report", src, "--scheme", scheme, "--format", "json").stdout)
    (t,) = doc["tensors"]
    assert t["results"][scheme]["quantized"] is False
    assert t["results"][scheme]["passthrough"] == \
        f"{scheme}: its restoration in {t['dtype']} would overflow to inf"


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric", "gnmt", "symmetric-unsigned"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_what_quantizes_near_the_maximum_restores(tmp_path, scheme, dtype):
    """The refusal is exact: whatever passes restores without inf in its own dtype."""
    top = float(ml_dtypes.finfo(dtype).max)
    rng = np.random.default_rng(1)
    for i, frac in enumerate((0.5, 0.9, 0.99, 0.999, 1.0)):
        w = rng.uniform(-top * frac, top * frac, (8, 16))
        if scheme == "symmetric-unsigned":
            w = np.abs(w)
        src = write_checkpoint(tmp_path / f"m{i}.safetensors", {"w": w.astype(dtype)})
        out = tmp_path / f"o{i}"
        r = run("quantize", src, out, "--scheme", scheme, "-q", expect=None)
        dry = json.loads(run("report", src, "--scheme", scheme, "--format", "json").stdout)
        # the dry run quantizes exactly what quantize does not refuse
        assert dry["tensors"][0]["results"][scheme]["quantized"] is (r.exit_code == 0)
        if r.exit_code == 2:
            assert "restoration would overflow" in r.stderr
            continue
        assert r.exit_code == 0, r.stderr
        run("dequantize", out, tmp_path / f"r{i}.safetensors", "-q")
        restored = load_file(str(tmp_path / f"r{i}.safetensors"))["w"]
        assert np.isfinite(restored.astype(np.float32)).all()


# --------------------------------------------------------------------------------------------
# reading outside an artifact; FIFOs; no echo of bytes


def _secret(tmp_path: Path) -> Path:
    """A file outside the artifact whose bytes must never be shown."""
    p = tmp_path / "secret"
    p.write_bytes(b"TOPSECRETPASSWORD" * 4)
    return p


SECRET_LEN8 = str(struct.unpack("<Q", b"TOPSECRE")[0])


@pytest.mark.parametrize("name", ["model.safetensors", "model.scale.safetensors", "qtool.json"])
def test_symlink_inside_artifact_is_refused(tmp_path, art, name):
    secret = _secret(tmp_path)
    (art / name).unlink()
    (art / name).symlink_to(secret)
    for args in (("dequantize", art, tmp_path / "r.safetensors"), ("report", art),
                 ("verify", art)):
        r = run(*args, expect=2)
        assert "Traceback" not in r.stderr and f"{art / name}: is a symbolic link" in r.stderr
        assert SECRET_LEN8 not in r.stderr and "TOPSECRE" not in r.stderr
        assert hashlib.sha256(secret.read_bytes()).hexdigest() not in r.stderr
        assert blake3.blake3(secret.read_bytes()).hexdigest() not in r.stderr  # format 2+
    assert not (tmp_path / "r.safetensors").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["model.safetensors", "model.zero_point.safetensors",
                                  "qtool.json"])
def test_fifo_inside_artifact_does_not_hang(tmp_path, art, name):
    (art / name).unlink()
    os.mkfifo(art / name)  # a reader of a FIFO without a writer blocks forever
    _fails(tmp_path, ("dequantize", art, tmp_path / "r.safetensors"), f"{art / name}",
           "a FIFO, not a regular file")
    _fails(tmp_path, ("report", art), f"{art / name}", "a FIFO, not a regular file")
    r = run("verify", art, expect=2)
    if name == "qtool.json":  # no manifest: the one-line error of any unreadable artifact
        assert r.stderr == f"qtool: error: {art / name}: a FIFO, not a regular file\n"
    else:  # named once, though both the file and the tensor checks meet it
        assert r.stderr == (f"qtool: error: {art / name}: a FIFO, not a regular file\n"
                            f"qtool: error: {art}: 1 problem; the artifact does not verify\n")


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory", "over_cap"])
@pytest.mark.parametrize("flag", ["--recipe", "--energy-model"])
def test_option_files_are_non_blocking_regular_and_capped(tmp_path, ckpt, flag, kind):
    p = tmp_path / "opt"
    if kind == "fifo":
        os.mkfifo(p)
        fragment = "a FIFO, not a regular file"
    elif kind == "dev_zero":
        p = Path("/dev/zero")
        fragment = "a character device, not a regular file"
    elif kind == "directory":
        p.mkdir()
        fragment = "a directory, not a regular file"
    else:
        with open(p, "wb") as f:
            f.truncate(2_000_000_000)  # sparse: no disk used
        fragment = "bytes, over the"
    _fails(tmp_path, ("report", ckpt, flag, p), f"{p}: ", fragment, watch=(ckpt.parent,))


# --------------------------------------------------------------------------------------------
# messages and leniency


def test_full_disk_names_the_target_and_what_to_do(tmp_path, ckpt, monkeypatch):
    def full(self, mv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(writer_mod.SafetensorsWriter, "_put", full)
    out = tmp_path / "out"
    line = _fails(tmp_path, ("quantize", ckpt, out, "-q"), f"{out}: no space left on the device",
                  "free some space or write elsewhere; nothing was written", watch=(ckpt.parent,))
    assert "qtool-tmp" not in line and not out.exists()


def test_unwritable_place_names_the_path_given_not_a_temporary_one(tmp_path, ckpt):
    out = Path("/proc/qtool-test-out")
    line = _fails(tmp_path, ("quantize", ckpt, out, "-q"), f"{out}: cannot create the output",
                  watch=(ckpt.parent,))
    assert "qtool-tmp" not in line


def test_infinite_scale_is_called_corrupt_not_a_dtype_problem(tmp_path, art):
    from tests.test_security import _patch_tensor

    name = json.loads((art / "qtool.json").read_text())["tensors"][0]["name"]
    for t in json.loads((art / "qtool.json").read_text())["tensors"]:
        if "scheme" in t:
            name = t["name"]
            break
    # Same shapes, same size: only `verify` or `--verify` (the digests) would notice.
    _patch_tensor(art / "model.scale.safetensors", name, lambda s: s * np.float32("inf"))
    line = _fails(tmp_path, ("dequantize", art, tmp_path / "r.safetensors"),
                  f"tensor {name!r}: ", "scales are not finite and > 0; the artifact is corrupt")
    assert "--dtype" not in line


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_json_literals_are_refused_in_headers(tmp_path, literal):
    src = tmp_path / "in" / "m.safetensors"
    src.parent.mkdir()
    entry = '"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    blob = ('{"__metadata__": {"x": ' + literal + "}, " + entry + "}").encode()
    blob += b" " * (-len(blob) % 8)
    src.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0\0\0\0")
    _fails(tmp_path, ("quantize", src, tmp_path / "out"), f"{src}: header is not valid JSON",
           f"{literal.lstrip('-')} is not a JSON value", watch=(src.parent,))


def test_non_json_literal_in_index_metadata_is_refused(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_checkpoint(d / "a.safetensors", {"w": np.ones((4, 4), np.float32)})
    idx = d / "m.safetensors.index.json"
    idx.write_text('{"metadata": {"total_size": NaN}, "weight_map": {"w": "a.safetensors"}}')
    _fails(tmp_path, ("quantize", idx, tmp_path / "out"), f"{idx}: index is not valid JSON",
           "NaN is not a JSON value", watch=(d,))


@pytest.mark.parametrize("version, shown", [(True, "True"), (2.0, "2.0"), (1.0, "1.0")])
def test_format_version_must_be_the_integer(tmp_path, art, version, shown):
    from tests.test_security import _write_manifest

    m = json.loads((art / "qtool.json").read_text())
    m["format_version"] = version  # `true == 1` and `2.0 == 2` in Python
    _write_manifest(art, m)
    _fails(tmp_path, ("dequantize", art, tmp_path / "r.safetensors"),
           f"{art / 'qtool.json'}: unknown format_version {shown}",
           watch=(art,))


def _torch_zip(p: Path) -> None:
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/data/0", b"\0" * 16)


def _npz(p: Path) -> None:
    np.savez(p, w=np.ones(3))


@pytest.mark.parametrize("name, make, kind", [
    ("model.gguf", lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\0" * 64),
     "a GGUF file"),
    ("pytorch_model.bin", _torch_zip, "a PyTorch checkpoint (a zip of pickles"),
    ("old_model.bin", lambda p: p.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8" + b"\0" * 32),
     "a Python pickle"),
    ("model.onnx", lambda p: p.write_bytes(b"\x08\x07\x12\x07pytorch" + b"\0" * 32),
     "an ONNX model"),
    ("w.npy", lambda p: np.save(p, np.ones(3)), "a NumPy .npy array"),
    ("w.npz", _npz, "a NumPy .npz archive"),
    ("config.json", lambda p: p.write_text('{"architectures": ["LlamaForCausalLM"], '
                                           '"model_type": "llama"}'), "a model configuration"),
], ids=["gguf", "torch_zip", "torch_pickle", "onnx", "npy", "npz", "config_json"])
def test_other_formats_are_named(tmp_path, name, make, kind):
    d = tmp_path / "in"
    d.mkdir()
    p = d / name
    make(p)
    for command in ("quantize", "report"):
        args = (command, p, tmp_path / "out") if command == "quantize" else (command, p)
        line = _fails(tmp_path, args, f"{p}: this is {kind}", "not a safetensors file",
                      "qtool reads .safetensors files", watch=(d,))
        assert "header length" not in line and "weight_map" not in line


def test_header_length_of_an_unknown_file_is_not_echoed(tmp_path):
    p = tmp_path / "in" / "m.safetensors"
    p.parent.mkdir()
    p.write_bytes(b"TOPSECRETPASSWORD" * 4)
    line = _fails(tmp_path, ("quantize", p, tmp_path / "out"), "header length (first 8 bytes)",
                  watch=(p.parent,))
    assert SECRET_LEN8 not in line


def test_directory_of_another_format_says_what_it_holds(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _torch_zip(d / "pytorch_model.bin")
    (d / "config.json").write_text('{"model_type": "bert"}')
    _fails(tmp_path, ("quantize", d, tmp_path / "out"), f"{d}: directory holds no .safetensors",
           "but pytorch_model.bin is a PyTorch checkpoint", "qtool reads .safetensors files",
           watch=(d,))


# --------------------------------------------------------------------------------------------
# a sharded artifact's index; two real processes


@pytest.fixture
def sharded_art(tmp_path: Path) -> Path:
    from tests.test_security import _sharded

    out = tmp_path / "sart"
    run("quantize", _sharded(tmp_path), out, "-q")
    assert (out / "model.safetensors.index.json").is_file()
    return out


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_sharded_artifact_index_is_not_followed_or_waited_on(tmp_path, sharded_art, kind):
    idx = sharded_art / "model.safetensors.index.json"
    secret = _secret(tmp_path)
    idx.unlink()
    if kind == "symlink":
        idx.symlink_to(secret)
        fragment = f"{idx}: is a symbolic link"
    else:
        os.mkfifo(idx)
        fragment = f"{idx}: a FIFO, not a regular file"
    line = _fails(tmp_path, ("dequantize", sharded_art, tmp_path / "restored"), fragment)
    assert "TOPSECRE" not in line and not (tmp_path / "restored").exists()
    assert fragment in run("verify", sharded_art, expect=2).stderr


def test_two_processes_into_one_new_target(tmp_path):
    """Two real `qtool quantize` processes into one new OUT, both past their checks: the
    first is stopped (SIGSTOP) once its staging directory exists, the second runs to the end
    and wins; the first, continued, must exit 2 with the one-line message and leave the
    winner intact."""
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "in" / "m.safetensors"
    src.parent.mkdir()
    rng = np.random.default_rng(0)
    # 16 MB: enough work that the first run is caught while it writes (polled every ms).
    write_checkpoint(src, {f"l{i}.weight": rng.normal(size=(512, 512)).astype(np.float32)
                           for i in range(16)})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qtool", "quantize", str(src), str(out), "-q", "--jobs", "1"]
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not leftovers(tmp_path) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    first.send_signal(signal.SIGSTOP)
    try:
        assert first.poll() is None and leftovers(tmp_path), "the first run was not caught"
        second = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        winner = snapshot(out)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 2
    err = first.stderr.read()
    assert err == (f"qtool: error: {out}: was created by another process while qtool was "
                   "writing; it was left untouched and nothing was written\n"), err
    assert snapshot(out) == winner and verify(out) == [] and leftovers(tmp_path) == []


def test_report_without_original_reads_no_tensor_data(tmp_path, art):
    """docs/SECURITY.md, Not guaranteed: `report ART` reports the manifest's figures after
    the cheap checks only. A NaN written over a scale in place (size kept) reports as before;
    `report --verify` and `verify` catch it; a broken sidecar header is still refused."""
    before = run("report", art, "--format", "json").stdout
    sc = art / "model.scale.safetensors"
    raw = bytearray(sc.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    first = json.loads(raw[8:8 + n])["layers.0.attn.q.weight"]["data_offsets"][0]
    raw[8 + n + first:8 + n + first + 4] = struct.pack("<f", float("nan"))
    sc.write_bytes(bytes(raw))
    assert run("report", art, "--format", "json").stdout == before
    assert_one_line_error(run("report", art, "--verify", expect=None),
                          f"{sc}: blake3 differs from the manifest's")
    r = run("verify", art, "-q", expect=2)
    assert "tensor 'layers.0.attn.q.weight': 1 of " in r.stderr
    raw[8:10] = b"X "  # the header's first bytes: '{"' -> 'X '
    sc.write_bytes(bytes(raw))
    assert_one_line_error(run("report", art, expect=None), f"{sc}: ")
