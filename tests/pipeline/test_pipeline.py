"""qtool.pipeline at checkpoint scale: sharded round trips, paths in the index, byte-identical
output whatever --jobs, the streaming writer's files as the safetensors library reads them,
and bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import blake3
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import qtool.core.blocks as blocks
import qtool.core.quant as quant
import qtool.pipeline.streams as pipeline
from qtool.core.schemes import QuantSpec
from qtool.formats.safetensors import SafetensorsFile
from qtool.formats.writer import SafetensorsWriter
from tests.conftest import run, tensor_order

META = {"format": "pt"}


def _load(path: Path) -> tuple[dict[str, np.ndarray], dict | None]:
    with safe_open(str(path), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _sharded(root: Path, names: tuple[str, ...] = ("model-00001-of-00003.safetensors",
                                                   "model-00002-of-00003.safetensors",
                                                   "model-00003-of-00003.safetensors"),
             index_name: str = "model.safetensors.index.json",
             seed: int = 0) -> tuple[Path, dict[str, np.ndarray], dict[str, str]]:
    """A Hugging Face style sharded checkpoint: float32, bf16 and fp16 weights, biases, an
    integer buffer, spread over ``names`` (which may hold subdirectories)."""
    rng = np.random.default_rng(seed)
    per_shard = [
        {"embed.weight": rng.normal(0, 0.02, (40, 24)).astype(np.float32),
         "layers.0.q.weight": rng.normal(0, 0.05, (24, 24)).astype(ml_dtypes.bfloat16),
         "layers.0.q.bias": rng.normal(0, 0.01, (24,)).astype(np.float32)},
        {"layers.0.mlp.weight": rng.normal(0, 0.05, (48, 24)).astype(np.float16),
         "layers.0.norm.weight": np.ones(24, np.float32),
         "position_ids": np.arange(12, dtype=np.int64).reshape(1, 12)},
        {"head.weight": rng.standard_t(3, (30, 24)).astype(np.float32),
         "conv.weight": rng.normal(0, 0.1, (6, 3, 3, 3)).astype(np.float32)},
    ]
    tensors: dict[str, np.ndarray] = {}
    weight_map: dict[str, str] = {}
    for name, group in zip(names, per_shard, strict=False):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(group, str(path), metadata=META)
        tensors.update(group)
        weight_map.update({k: name for k in group})
    index = root / index_name
    index.write_text(json.dumps({"metadata": {"total_size": 1234}, "weight_map": weight_map}))
    return index, tensors, weight_map


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# --------------------------------------------------------------------------- sharded


def test_sharded_round_trip(tmp_path):
    index, tensors, weight_map = _sharded(tmp_path / "ckpt")
    out = tmp_path / "art"
    run("quantize", index, out, "--scheme", "asymmetric", "--quiet")

    shards = sorted(set(weight_map.values()))
    stems = [s.removesuffix(".safetensors") for s in shards]
    expected = {"qtool.json", index.name} | {f"{st}{kind}.safetensors" for st in stems
                                            for kind in ("", ".scale", ".zero_point")}
    assert set(_files(out)) == expected

    # the output index maps every tensor and every sidecar to its file
    idx = json.loads((out / index.name).read_text())
    assert idx["metadata"] == {"total_size": 1234}
    assert idx["weight_map"] == weight_map
    quantized = {"embed.weight", "layers.0.q.weight", "layers.0.mlp.weight", "head.weight",
                 "conv.weight"}
    assert idx["scale_map"] == {
        n: weight_map[n].replace(".safetensors", ".scale.safetensors") for n in quantized}
    assert idx["zero_point_map"] == {
        n: weight_map[n].replace(".safetensors", ".zero_point.safetensors") for n in quantized}

    # one manifest for the whole artifact, with the digest of every file as written
    m = json.loads((out / "qtool.json").read_text())
    assert m["shards"] == shards and m["index"] == index.name
    assert set(m["files"]) == expected - {"qtool.json"}
    for name, info in m["files"].items():
        blob = (out / name).read_bytes()
        assert info == {"size": len(blob), "blake3": blake3.blake3(blob).hexdigest()}, name
    assert [t["name"] for t in m["tensors"]] == [
        n for s in shards for n in tensor_order(index.parent / s)]

    # each shard keeps its tensors, order and metadata; each sidecar has its quantized ones
    for shard, st in zip(shards, stems, strict=True):
        q, meta = _load(out / shard)
        # marked as qtool's (model loaders refuse it); the source's metadata kept as JSON
        assert meta == {"format": "qtool", "qtool_source_metadata": json.dumps(META)}
        assert tensor_order(out / shard) == tensor_order(index.parent / shard)
        scales, _ = _load(out / f"{st}.scale.safetensors")
        assert set(scales) == {n for n in quantized if weight_map[n] == shard}

    # dequantize restores a drop-in directory: same file names, same index
    restored = tmp_path / "restored"
    run("dequantize", out, restored, "--quiet")
    assert set(_files(restored)) == {index.name, *shards}
    assert json.loads((restored / index.name).read_text()) == {
        "metadata": {"total_size": 1234}, "weight_map": weight_map}
    for shard in shards:
        back, meta = _load(restored / shard)
        assert meta == META
        assert tensor_order(restored / shard) == tensor_order(index.parent / shard)
        for name, w in back.items():
            orig = tensors[name]
            assert w.dtype == orig.dtype and w.shape == orig.shape, name
            if name not in quantized:
                assert w.tobytes() == orig.tobytes(), name
                continue
            rows = orig.shape[0]
            w32 = orig.astype(np.float32).reshape(rows, -1)
            # asymmetric per channel: |w - w_hat| <= scale / 2, scale = (hi - lo) / 255 per row
            span = np.maximum(w32.max(1), 0) - np.minimum(w32.min(1), 0)
            err = np.abs(w.astype(np.float32).reshape(rows, -1) - w32)
            ulp = np.spacing(np.abs(w32).max()) if orig.dtype == np.float32 else \
                np.abs(w32).max() / (128 if orig.dtype == ml_dtypes.bfloat16 else 1024)
            assert np.all(err <= (span / 255 / 2)[:, None] * 1.0001 + ulp), name

    # the restored directory is a checkpoint qtool reads again, and quantizes the same way
    again = tmp_path / "again"
    run("quantize", restored, again, "--scheme", "asymmetric", "--quiet")
    assert set(_files(again)) == expected


def test_directory_and_index_inputs_give_identical_artifacts(tmp_path):
    index, _, _ = _sharded(tmp_path / "ckpt")
    run("quantize", index, tmp_path / "a", "--quiet")
    run("quantize", index.parent, tmp_path / "b", "--quiet")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b


def test_report_of_a_sharded_artifact_covers_every_shard(tmp_path):
    index, tensors, _ = _sharded(tmp_path / "ckpt")
    out = tmp_path / "art"
    run("quantize", index, out, "--quiet")
    r = run("report", out, "--format", "json")
    doc = json.loads(r.stdout)
    names = json.dumps(doc)
    for name in tensors:
        assert name in names


# --------------------------------------------------------------------------- index paths


def test_index_with_shards_in_subdirectories_and_dot_slash(tmp_path):
    root = tmp_path / "ckpt"
    index, tensors, _ = _sharded(root, names=("part1/a.safetensors", "./b.safetensors",
                                              "part2/c.safetensors"))
    out = tmp_path / "art"
    run("quantize", index, out, "--quiet")
    # the artifact is flat: each shard's files are named after the shard's file name
    idx = json.loads((out / index.name).read_text())
    assert set(idx["weight_map"].values()) == {"a.safetensors", "b.safetensors",
                                               "c.safetensors"}
    restored = tmp_path / "restored"
    run("dequantize", out, restored, "--quiet")
    back = {}
    for p in restored.glob("*.safetensors"):
        back.update(load_file(p))
    assert set(back) == set(tensors)


@pytest.mark.parametrize("shard, message", [
    ("../outside.safetensors", "contains '..'"),
    ("/etc/passwd", "absolute path"),
    ("missing.safetensors", "is missing"),
])
def test_index_path_escapes_are_refused_and_nothing_is_written(tmp_path, shard, message):
    index, _, weight_map = _sharded(tmp_path / "ckpt")
    (tmp_path / "outside.safetensors").write_bytes(
        (tmp_path / "ckpt" / weight_map["head.weight"]).read_bytes())
    doc = json.loads(index.read_text())
    doc["weight_map"]["head.weight"] = shard
    index.write_text(json.dumps(doc))
    out = tmp_path / "art"
    r = run("quantize", index, out, expect=2)
    assert r.stderr.startswith("qtool: error: ") and message in r.stderr
    assert r.stderr.count("\n") == 1 and "head.weight" in r.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "outside.safetensors"]


def test_symlinked_shard_pointing_outside_is_refused(tmp_path):
    index, _, weight_map = _sharded(tmp_path / "ckpt")
    victim = tmp_path / "ckpt" / weight_map["head.weight"]
    outside = tmp_path / "elsewhere.safetensors"
    victim.rename(outside)
    victim.symlink_to(outside)
    r = run("quantize", index, tmp_path / "art", expect=2)
    assert "resolves outside" in r.stderr
    assert not (tmp_path / "art").exists()


def test_shards_with_the_same_name_in_two_subdirectories_are_refused(tmp_path):
    index, _, _ = _sharded(tmp_path / "ckpt", names=("x/model.safetensors",
                                                     "y/model.safetensors",
                                                     "z.safetensors"))
    r = run("quantize", index, tmp_path / "art", expect=2)
    assert "model.safetensors" in r.stderr and "rename" in r.stderr
    assert not (tmp_path / "art").exists()


def test_shard_named_like_a_sidecar_is_refused(tmp_path):
    index, _, _ = _sharded(tmp_path / "ckpt", names=("m.safetensors",
                                                     "m.scale.safetensors",
                                                     "n.safetensors"))
    r = run("quantize", index, tmp_path / "art", expect=2)
    assert "m.scale.safetensors" in r.stderr
    assert not (tmp_path / "art").exists()


# --------------------------------------------------------------------------- --jobs


def _mixed_checkpoint(path: Path) -> Path:
    rng = np.random.default_rng(11)
    save_file({
        "a.weight": rng.normal(0, 0.05, (300, 97)).astype(np.float32),
        "b.weight": rng.standard_t(3, (64, 700)).astype(ml_dtypes.bfloat16),
        "c.weight": rng.normal(0, 1, (129, 5, 7)).astype(np.float16),
        "d.weight": rng.normal(0, 1, (77, 33)),
        "e.bias": rng.normal(0, 1, (5000,)).astype(np.float32),
        "f.ids": np.arange(3000, dtype=np.int32),
    }, str(path), metadata=META)
    return path


@pytest.mark.parametrize("args", [
    ("--scheme", "symmetric"),
    ("--scheme", "gnmt"),
    ("--scheme", "asymmetric", "--granularity", "tensor"),
    ("--scheme", "symmetric", "--granularity", "group", "--group-size", "32", "--bits", "4"),
    ("--scheme", "asymmetric", "--range", "percentile", "--bits", "3"),
], ids=lambda a: "-".join(x.strip("-") for x in a))
def test_output_is_byte_identical_whatever_jobs(tmp_path, monkeypatch, args):
    # Small blocks, tasks and runs, so that every tensor spans many of each and the threads
    # really interleave.
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(blocks, "TASK_ELEMENTS", 3000)
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 20_000)
    monkeypatch.setattr(pipeline, "QUANTIZE_CHUNK_BYTES", 30_000)
    src = _mixed_checkpoint(tmp_path / "model.safetensors")
    arts, restored = [], []
    for jobs in (1, 2, 4):
        out = tmp_path / f"art{jobs}"
        run("quantize", src, out, "--quiet", "--jobs", str(jobs), *args)
        arts.append(_files(out))
        back = tmp_path / f"back{jobs}.safetensors"
        run("dequantize", out, back, "--quiet", "--jobs", str(jobs))
        restored.append(back.read_bytes())
    assert arts[0] == arts[1] == arts[2]
    assert restored[0] == restored[1] == restored[2]
    # and the streamed artifact equals the in-memory quantization of each tensor
    q, _ = _load(tmp_path / "art1" / "model.safetensors")
    m = json.loads((tmp_path / "art1" / "qtool.json").read_text())
    with SafetensorsFile(src) as f:
        for t in m["tensors"]:
            if "passthrough" in t:
                continue
            spec = QuantSpec(**{k: t[k] for k in ("scheme", "bits", "granularity",
                                                        "group_size", "range", "percentile",
                                                        "scale_dtype")
                                      if k in t})
            qt = quant.quantize(f.read(t["name"]), spec)
            assert q[t["name"]].tobytes() == qt.data.tobytes(), t["name"]


# --------------------------------------------------------------------------- streaming I/O


def test_streaming_writer_files_read_back_with_safetensors(tmp_path):
    rng = np.random.default_rng(2)
    tensors = {
        "big": rng.normal(size=(513, 77)).astype(np.float32),
        "bf": rng.normal(size=(40, 9)).astype(ml_dtypes.bfloat16),
        "empty": np.zeros((0, 3), np.float32),
        "ints": np.arange(1001, dtype=np.int64),
        "scalar": np.array(3.5, np.float64),
    }
    released = []
    p = tmp_path / "s.safetensors"
    entries = [(n, {"float32": "F32", "bfloat16": "BF16", "int64": "I64",
                    "float64": "F64"}[str(a.dtype)], a.shape) for n, a in tensors.items()]
    with SafetensorsWriter(p, entries, metadata={"k": "v"}, background=True,
                           queue_depth=1) as w:
        for name, a in tensors.items():
            flat = np.ascontiguousarray(a).reshape(-1)
            if flat.size == 0:
                w.write(name, a)
                continue
            for i in range(0, flat.size, 1000):  # pieces that do not align with rows
                piece = flat[i:i + 1000].copy()
                w.write_chunk(name, piece, release=lambda n=name, i=i: released.append((n, i)))
    blob = p.read_bytes()
    assert w.digest == blake3.blake3(blob).hexdigest() and w.size == len(blob)
    assert len(released) == sum(-(-a.size // 1000) for a in tensors.values() if a.size)
    back = load_file(p)
    for name, a in tensors.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape
        assert back[name].tobytes() == a.tobytes(), name
    with safe_open(str(p), "numpy") as f:
        assert f.metadata() == {"k": "v"}


def test_streaming_writer_without_digest_and_chunk_errors(tmp_path):
    p = tmp_path / "n.safetensors"
    with SafetensorsWriter(p, [("a", "F32", (4,))], digest=False, background=True) as w:
        with pytest.raises(ValueError, match="more than its 16 bytes"):
            w.write_chunk("a", np.zeros(5, np.float32))
        with pytest.raises(ValueError, match="out of order"):
            w.write_chunk("b", np.zeros(1, np.float32))
        with pytest.raises(ValueError, match="C-contiguous"):
            w.write_chunk("a", np.zeros((2, 4), np.float32)[:, :2])
        w.write_chunk("a", np.arange(2, dtype=np.float32))
        with pytest.raises(ValueError, match="being written in chunks"):
            w.write("a", np.zeros(4, np.float32))
        w.write_chunk("a", np.arange(2, 4, dtype=np.float32))
    np.testing.assert_array_equal(load_file(p)["a"], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="only available after close"):
        _ = w.digest


def test_streaming_writer_background_error_is_raised_and_leaves_nothing(tmp_path, monkeypatch):
    p = tmp_path / "f.safetensors"
    w = SafetensorsWriter(p, [("a", "U8", (30,)), ("b", "U8", (1,))], background=True,
                          queue_depth=1)

    def full_disk(self, mv):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SafetensorsWriter, "_put", full_disk)
    released = []
    with pytest.raises(OSError, match="No space left"):
        for i in range(3):
            w.write_chunk("a", np.full(10, i, np.uint8), release=lambda i=i: released.append(i))
        w.write("b", b"x")
        w.close()
    w.abort()
    assert list(tmp_path.iterdir()) == []
    # every queued piece was handed back, so no producer waits forever for a buffer
    assert released == list(range(len(released))) and released


def test_view_maps_exactly_the_elements_asked_for(tmp_path):
    a = np.arange(5000, dtype=np.float32).reshape(50, 100)
    p = tmp_path / "v.safetensors"
    save_file({"pad": np.zeros(3, np.uint8), "a": a}, str(p))
    with SafetensorsFile(p) as f:
        v = f.view("a", 120, 4321)
        np.testing.assert_array_equal(v, a.reshape(-1)[120:4321])
        assert not v.flags.writeable
        np.testing.assert_array_equal(f.view("a"), a.reshape(-1))
        assert f.view("a", 7, 7).size == 0
        with pytest.raises(ValueError, match="bad element range"):
            f.view("a", 10, 5001)


# --------------------------------------------------------------------------- memory


# Runs qtool's entry point and reports the process's own peak resident set (VmHWM). The
# kernel's ru_maxrss of a child is no use here: it includes the parent's peak at the fork.
_PEAK = """
import os, sys
sys.argv = ["qtool", *sys.argv[1:]]
try:
    from qtool.cli import main
    main()
finally:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(os.environ["QTOOL_PEAK_FILE"], "w") as f:
        f.write(str(kb * 1024))
"""


def _peak_rss(args: list[str], tmp_path: Path) -> int:
    """Peak resident bytes of ``qtool args`` run in a process of its own."""
    peak_file = tmp_path / "peak"
    env = dict(os.environ, QTOOL_PEAK_FILE=str(peak_file))
    proc = subprocess.run([sys.executable, "-c", _PEAK, *args], capture_output=True, env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    return int(peak_file.read_text())


def test_memory_stays_bounded_by_the_largest_tensor(tmp_path):
    """16 tensors of 16 MiB float32 (256 MiB): quantize and dequantize each stay under the
    bound of the issue, 2 x the largest tensor + 150 MB, well under the checkpoint's size.
    """
    rows, cols = 2048, 2048
    base = np.linspace(-1, 1, cols, dtype=np.float32)
    tensors = {f"layer.{i}.weight": np.tile(base * (i + 1), (rows, 1)) for i in range(16)}
    src = tmp_path / "model.safetensors"
    save_file(tensors, str(src))
    del tensors
    size = src.stat().st_size
    bound = 2 * rows * cols * 4 + 150e6
    assert bound < size
    peak_q = _peak_rss(["quantize", str(src), str(tmp_path / "art"), "-q"], tmp_path)
    assert peak_q < bound, (peak_q, bound)
    peak_d = _peak_rss(["dequantize", str(tmp_path / "art"), str(tmp_path / "back.st"), "-q"],
                      tmp_path)
    assert peak_d < bound, (peak_d, bound)
    with safe_open(str(tmp_path / "back.st"), "numpy") as f:
        np.testing.assert_allclose(f.get_tensor("layer.3.weight")[17], base * 4,
                                   atol=4 / 127 / 2 * 1.001)
    os.unlink(src)


def test_quantize_parses_the_source_header_once(tmp_path, monkeypatch):
    """The run takes the file the checkpoint validated instead of parsing its header again
    (with very many tensors a second parse doubled the per-tensor state)."""
    src = tmp_path / "m.safetensors"
    save_file({f"w{i}": np.full((2, 4), i, np.float32) for i in range(5)}, str(src))
    parsed: list[Path] = []
    real = SafetensorsFile._parse

    def counting(self):
        parsed.append(Path(self.path))
        return real(self)

    monkeypatch.setattr(SafetensorsFile, "_parse", counting)
    run("quantize", src, tmp_path / "art", "-q")
    assert parsed.count(src) == 1
    run("report", src, "--format", "json")
    assert parsed.count(src) == 2  # the dry run: once, for its own checkpoint


def test_a_checkpoint_closes_the_file_no_run_took(tmp_path):
    import gc

    from qtool.formats.shards import open_checkpoint

    src = tmp_path / "m.safetensors"
    save_file({"w": np.ones((2, 4), np.float32)}, str(src))
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    gc.collect()
    before = fds()
    ckpt = open_checkpoint(src)
    assert fds() == before + 1
    f = ckpt.take_file(src)
    assert [t.name for t in f.tensors] == ["w"] and f.tensors is ckpt.tensor_infos()
    again = ckpt.take_file(src)  # taken once: a second call opens the file anew
    assert again is not f and fds() == before + 2
    again.close()
    f.close()
    ckpt = open_checkpoint(src)
    assert fds() == before + 1
    del ckpt
    gc.collect()
    assert fds() == before


def test_dequantize_parses_each_artifact_header_once(tmp_path, monkeypatch):
    """The source takes the files its manifest check validated (the first shard's), and
    checks each later shard when it opens it: every header of the artifact is parsed once a
    run, not once for the checks and again for reading."""
    index, tensors, _ = _sharded(tmp_path / "ckpt")
    art = tmp_path / "art"
    run("quantize", index, art, "-q")
    parsed: list[Path] = []
    real = SafetensorsFile._parse

    def counting(self):
        parsed.append(Path(self.path).name)
        return real(self)

    monkeypatch.setattr(SafetensorsFile, "_parse", counting)
    run("dequantize", art, tmp_path / "back", "-q")
    stems = [f"model-0000{i}-of-00003" for i in (1, 2, 3)]
    want = {f"{s}{kind}.safetensors" for s in stems for kind in ("", ".scale", ".zero_point")}
    assert sorted(parsed) == sorted(want)  # each once, none twice
    back = {}
    for s in stems:
        back.update(load_file(tmp_path / "back" / f"{s}.safetensors"))
    assert back.keys() == tensors.keys()
    assert back["position_ids"].tolist() == tensors["position_ids"].tolist()


def test_dequantize_checks_a_later_shard_when_it_opens_it(tmp_path):
    """A later shard is checked against the manifest when the run reaches it: its bad
    header is still one line naming the file and tensor, exit 2, and nothing is restored."""
    index, _, _ = _sharded(tmp_path / "ckpt")
    art = tmp_path / "art"
    run("quantize", index, art, "-q")
    third = art / "model-00003-of-00003.safetensors"
    blob = third.read_bytes()
    assert blob.count(b'"head.weight"') == 1
    third.write_bytes(blob.replace(b'"head.weight"', b'"head.weighs"'))  # same size
    out = tmp_path / "back"
    r = run("dequantize", art, out, expect=2)
    assert r.stderr.strip().splitlines() == [
        f"qtool: error: {third}: tensor 'head.weight' is missing"]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["art", "ckpt"]
