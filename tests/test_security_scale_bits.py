"""Hostile format_version 3 (``--scale-bits 8``) artifacts: the row-scale sidecar and the scale
codes tampered with, and the digests in the manifest updated to match (anyone can reseal a
manifest: its digest is no signature). Every reader (``verify``, ``dequantize``, ``report
--original``, ``export``) refuses them with one line naming the file and the tensor, exit 2,
no traceback, no output left behind, the artifact unchanged; verify lists the problem.

The artifact is quantized from a model folder (config.json), so that export runs too."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import blake3
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from qtool.formats.manifest import seal
from tests.conftest import run
from tests.pipeline.test_export import model_folder
from tests.test_security import assert_one_line_error, leftovers, snapshot

ARGS = ["--scheme", "asymmetric", "--bits", "4", "-g", "group", "--group-size", "16",
        "--scale-bits", "8"]
T = "model.layers.0.mlp.up_proj.weight"  # (96, 64): 96 row scales, 96 x 4 codes
RS = "model.row_scale.safetensors"
SC = "model.scale.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sb")
    src = model_folder(root / "model")
    run("quantize", src, root / "art", *ARGS, "-q")
    assert (root / "art" / RS).exists()
    return src, root / "art"


def _load(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _reseal(art: Path, *files: str, edit: Callable[[dict], None] | None = None) -> None:
    """Update the manifest's sizes and digests of ``files`` (and apply ``edit``), resealed."""
    doc = json.loads((art / "qtool.json").read_text())
    for n in files:
        data = (art / n).read_bytes()
        doc["files"][n] = {"size": len(data), "blake3": blake3.blake3(data).hexdigest()}
    if edit is not None:
        edit(doc)
    (art / "qtool.json").write_text(seal(doc))


def _set(file: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def tamper(art: Path) -> None:
        d = _load(art / file)
        d[T] = fn(d[T].copy())
        save_file(d, str(art / file), metadata={"format": "qtool"})
        _reseal(art, file)
    return tamper


def _at(i: int, v: float) -> Callable[[np.ndarray], np.ndarray]:
    def fn(a: np.ndarray) -> np.ndarray:
        a.reshape(-1)[i] = v
        return a
    return fn


def _drop_tensor(art: Path) -> None:
    d = _load(art / RS)
    del d[T]
    save_file(d, str(art / RS), metadata={"format": "qtool"})
    _reseal(art, RS)


def _no_file(art: Path) -> None:
    (art / RS).unlink()
    _reseal(art, edit=lambda doc: doc["files"].pop(RS))


def _symlink(art: Path) -> None:
    outside = art.parent / f"{art.name}-outside.safetensors"
    shutil.copy(art / RS, outside)
    (art / RS).unlink()
    (art / RS).symlink_to(outside)


def _fifo(art: Path) -> None:
    (art / RS).unlink()
    os.mkfifo(art / RS)


def _v2_claims_scale_bits(art: Path) -> None:
    _reseal(art, edit=lambda doc: doc.update(format_version=2))


def _scale_bits_dropped(art: Path) -> None:
    """A version 3 manifest whose records lost scale_bits: the U8 codes are not F32 scales."""
    def edit(doc: dict) -> None:
        for t in doc["tensors"]:
            t.pop("scale_bits", None)
    _reseal(art, edit=edit)


# (id, tamper, fragment of every reader's line, fragment of verify's problem line)
CASES = [
    ("row_scale_nan", _set(RS, _at(3, np.nan)), f"{RS}: tensor {T!r}: 4 of 384 scales are not "
     "finite and > 0", "1 of 96 row scales are not finite and > 0"),
    ("row_scale_zero", _set(RS, _at(3, 0.0)), f"{RS}: tensor {T!r}: 4 of 384 scales",
     "1 of 96 row scales are not finite and > 0"),
    ("row_scale_negative", _set(RS, _at(3, -1.0)), f"{RS}: tensor {T!r}: 4 of 384 scales",
     "1 of 96 row scales are not finite and > 0"),
    ("row_scale_inf", _set(RS, _at(3, np.inf)), f"{RS}: tensor {T!r}: 4 of 384 scales",
     "1 of 96 row scales are not finite and > 0"),
    # each row scale finite, but code x row scale beyond float32 (codes are up to 255)
    ("row_scale_product_overflows", _set(RS, _at(3, 3e38)), f"{SC}: tensor {T!r}",
     "scales (codes x row scales) are not finite"),
    ("code_zero", _set(SC, _at(5, 0)), f"{SC}: tensor {T!r}: 1 of 384 scales are not finite",
     "1 of 384 scales are not finite and > 0"),
    ("row_scale_float16", _set(RS, lambda a: a.astype(np.float16)),
     f"{RS}: tensor {T!r} is F16 [96], expected F32 [96]", "is F16 [96], expected F32 [96]"),
    ("row_scale_float64", _set(RS, lambda a: a.astype(np.float64)),
     f"{RS}: tensor {T!r} is F64 [96], expected F32 [96]", "is F64 [96]"),
    ("row_scale_too_long", _set(RS, lambda a: np.resize(a, 97)),
     f"{RS}: tensor {T!r} is F32 [97], expected F32 [96]", "is F32 [97]"),
    ("row_scale_2d", _set(RS, lambda a: a.reshape(96, 1)),
     f"{RS}: tensor {T!r} is F32 [96, 1], expected F32 [96]", "is F32 [96, 1]"),
    ("row_scale_tensor_missing", _drop_tensor, f"{RS}: tensor {T!r}", "is missing"),
    ("row_scale_file_missing", _no_file, f"{RS}: cannot open", RS),
    ("row_scale_symlink", _symlink, f"{RS}: is a symbolic link", f"{RS}: is a symbolic link"),
    ("row_scale_fifo", _fifo, f"{RS}: a FIFO, not a regular file", "FIFO"),
    ("v2_manifest_with_scale_bits", _v2_claims_scale_bits,
     "scale_bits is not part of format_version 2", None),
    ("v3_manifest_without_scale_bits", _scale_bits_dropped,
     # the first coded tensor in the file is named (lm_head.weight, (32, 64))
     f"{SC}: tensor 'lm_head.weight' is U8 [32, 4], expected F32 [32, 4]",
     "is U8 [96, 4], expected F32 [96, 4]"),
]


def _commands(src: Path, art: Path, out: Path) -> list[tuple[str, ...]]:
    return [("dequantize", str(art), str(out / "restored.safetensors")),
            ("report", str(art), "--original", str(src)),
            ("export", str(art), str(out / "ct"), "--to", "compressed-tensors")]


@pytest.mark.parametrize(("tamper", "fragment", "verify_fragment"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_hostile_row_scales_are_refused_by_every_reader(tmp_path, base, tamper, fragment,
                                                        verify_fragment):
    src, good = base
    art = tmp_path / "art"
    shutil.copytree(good, art, symlinks=True)
    tamper(art)
    before = snapshot(art)
    out = tmp_path / "out"
    out.mkdir()
    for args in _commands(src, art, out):
        r = run(*args, expect=2)
        assert_one_line_error(r, fragment)
        assert list(out.iterdir()) == [] and leftovers(tmp_path) == [], args
    r = run("verify", art, expect=2)
    assert "Traceback" not in r.stderr and r.stdout == ""
    if verify_fragment is not None:
        problems = r.stderr.splitlines()
        assert any(verify_fragment in p and ("tensor '" not in p or repr(T) in p)
                   for p in problems), r.stderr
    else:
        assert_one_line_error(r, fragment)
    assert snapshot(art) == before


def test_subnormal_row_scale_is_valid(tmp_path, base):
    """A row scale below float32's normal range (quantize writes normal ones only) is still
    finite and > 0, as verify requires of every scale: read, not refused; the row restores as
    code x row scale x (q - z)."""
    src, good = base
    art = tmp_path / "art"
    shutil.copytree(good, art)
    _set(RS, _at(3, 1e-45))(art)
    run("verify", art, "-q")
    run("dequantize", art, tmp_path / "r.safetensors", "-q")
    got = _load(tmp_path / "r.safetensors")[T][3]
    codes = _load(art / SC)[T][3].astype(np.float32)
    zp = _load(art / "model.zero_point.safetensors")[T][3]
    q = _load(art / "model.safetensors")[T][3]
    qv = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(-1)[:64].astype(np.float32)
    zv = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(-1)[:4].astype(np.float32)
    scale = codes * np.float32(1e-45)
    want = (qv - np.repeat(zv, 16)) * np.repeat(scale, 16)
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_quantized_empty_tensor_with_scale_codes(tmp_path, base):
    """A manifest may record a tensor with no rows as quantized with scale codes (quantize keeps
    empty tensors in float, but the format allows it): read as an empty tensor, no crash."""
    src, good = base
    art = tmp_path / "art"
    shutil.copytree(good, art)
    name = "model.layers.0.self_attn.q_proj.weight"  # (64, 64) -> (0, 64)
    files = {"model.safetensors": np.zeros((0, 32), np.uint8), SC: np.zeros((0, 4), np.uint8),
             "model.zero_point.safetensors": np.zeros((0, 2), np.uint8),
             RS: np.zeros(0, np.float32)}
    for f, arr in files.items():
        d = _load(art / f)
        d[name] = arr
        meta = {"format": "qtool"} if f != "model.safetensors" else \
            safe_open(str(art / f), "numpy").metadata()
        save_file(d, str(art / f), metadata=meta)

    def edit(doc: dict) -> None:
        rec = next(t for t in doc["tensors"] if t["name"] == name)
        rec.update(shape=[0, 64], stored_shape=[0, 32], param_shape=[0, 4])
        rec.pop("metrics", None)
    _reseal(art, *files, edit=edit)
    run("verify", art, "-q")
    run("dequantize", art, tmp_path / "r.safetensors", "-q")
    assert _load(tmp_path / "r.safetensors")[name].shape == (0, 64)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sbs")
    src = model_folder(root / "model", shards=2)
    run("quantize", src, root / "art", *ARGS, "-q")
    return root / "art"


@pytest.mark.parametrize(("key", "edit", "fragment"), [
    ("row_scale_map", lambda m: m.__setitem__(T, "model-00002-of-00002.row_scale.safetensors"
                                              if "00001" in m[T] else
                                              "model-00001-of-00002.row_scale.safetensors"),
     f"row_scale_map places tensor {T!r}"),
    ("row_scale_map", lambda m: m.pop(T), f"row_scale_map places tensor {T!r} in None"),
    ("row_scale_map", None, "row_scale_map is missing"),
    ("scale_map", lambda m: m.__setitem__(T, "elsewhere.safetensors"),
     f"scale_map places tensor {T!r} in 'elsewhere.safetensors'"),
    ("zero_point_map", lambda m: m.__setitem__("lm_head.weight", "x.safetensors"),
     "zero_point_map places tensor 'lm_head.weight'"),
], ids=["row_scale_swapped", "row_scale_dropped", "row_scale_map_missing", "scale_map",
        "zero_point_map"])
def test_sharded_index_maps_must_match_the_manifest(tmp_path, sharded, key, edit, fragment):
    """The index's sidecar maps are what a loader following docs/FORMAT.md reads: one that
    sends a tensor's row scales (or scales, zero points) to another file is refused."""
    art = tmp_path / "art"
    shutil.copytree(sharded, art)
    index = "model.safetensors.index.json"
    doc = json.loads((art / index).read_text())
    if edit is None:
        del doc[key]
    else:
        edit(doc[key])
    (art / index).write_text(json.dumps(doc, indent=2) + "\n")
    _reseal(art, index)
    r = run("dequantize", art, tmp_path / "r", expect=2)
    assert_one_line_error(r, f"{art / index}: {fragment}")
    assert not (tmp_path / "r").exists()
    r = run("verify", art, expect=2)
    assert fragment in r.stderr and "Traceback" not in r.stderr
