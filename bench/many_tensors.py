"""Checkpoints of very many small tensors, and qtool's peak memory and time on them.

    python bench/many_tensors.py make OUT --count 100000 [--kind empty|tiny] [--name-len 60]
                                          [--shards 4]
    python bench/many_tensors.py measure --counts 50000,100000,200000 [--kind empty]
                                         [--name-len 60] [--shards K] [--only LABELS]

``make`` writes one safetensors file (or, with ``--shards K``, K shards and a Hugging Face
``model.safetensors.index.json``) of ``--count`` 2-D float32 tensors: ``empty`` ones of shape
(0, 8) or ``tiny`` ones of shape (2, 8), named like the experts of a mixture-of-experts model
and padded to ``--name-len`` characters. The header is written directly (no numpy arrays per
tensor), so a million tensors take seconds.

``measure`` builds such checkpoints under bench/_data/many/ and runs each qtool command on
them in its own process, printing peak resident memory (``/usr/bin/time``'s maximum RSS, or
``getrusage`` of the child) and wall time against the bound of docs/SECURITY.md: 2x the
largest tensor as float32 + 150 MB. Nothing here is part of qtool.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "_data" / "many"
BIN = Path(sys.executable).parent
QTOOL = [str(BIN / "qtool")] if (BIN / "qtool").exists() else [sys.executable, "-m", "qtool"]
MB = 1e6
BOUND_SLACK = 150 * MB


def tensor_name(i: int, name_len: int) -> str:
    layer, expert = divmod(i, 256)
    base = f"model.layers.{layer}.mlp.experts.{expert}.gate_proj"
    pad = max(0, name_len - len(base) - len(".weight"))
    return base + ("_" * pad) + ".weight"


def _header(names: list[str], kind: str, metadata: dict | None = None) -> tuple[bytes, int]:
    """The safetensors header (length prefix included) and the data size."""
    rows = 0 if kind == "empty" else 2
    nbytes = rows * 8 * 4
    parts = []
    if metadata is not None:
        parts.append('"__metadata__":' + json.dumps(metadata))
    pos = 0
    for name in names:
        parts.append(f'{json.dumps(name)}:{{"dtype":"F32","shape":[{rows},8],'
                     f'"data_offsets":[{pos},{pos + nbytes}]}}')
        pos += nbytes
    text = ("{" + ",".join(parts) + "}").encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, pos


def write_file(path: Path, names: list[str], kind: str) -> None:
    head, data = _header(names, kind, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(head)
        if data:
            # 16 distinct float32 values in [0.5, 1), so tiny tensors quantize to something.
            block = b"".join((0x3F000000 + k * 0x10000).to_bytes(4, "little")
                             for k in range(16))
            f.write(block * (data // len(block)))


def make(out: Path, count: int, kind: str = "empty", name_len: int = 60,
         shards: int = 0) -> Path:
    """Write the checkpoint; returns the path to pass to qtool (the file or the index)."""
    names = [tensor_name(i, name_len) for i in range(count)]
    if shards <= 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_file(out, names, kind)
        return out
    out.mkdir(parents=True, exist_ok=True)
    per = -(-count // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[s * per:(s + 1) * per]
        write_file(out / fname, chunk, kind)
        weight_map.update(dict.fromkeys(chunk, fname))
    index = out / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def run(argv: list[str], stdout: Path | None = None) -> tuple[float, int, float, int]:
    """Wall seconds, peak RSS in bytes, CPU seconds, exit code of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(stdout or os.devnull, "wb") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # ru_maxrss of children is the largest of any child so far: commands run in rising order
    # of cost would hide nothing, but to be exact each measure runs in a fresh helper process.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr.decode(errors="replace")[-2000:])
    return wall, after.ru_maxrss * 1024, cpu, proc.returncode


def measure_one(argv: list[str]) -> tuple[float, int, float, int]:
    """Run ``argv`` from a fresh helper process so that RUSAGE_CHILDREN is this command's."""
    here = str(Path(__file__).parent)
    code = (f"import json,sys;sys.path.insert(0,{here!r});from many_tensors import run;"
            "print(json.dumps(run(json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(argv)],
                         capture_output=True, text=True, check=True)
    wall, peak, cpu, rc = json.loads(out.stdout)
    return wall, peak, cpu, rc


def qtool_from(tree: Path) -> list[str]:
    """The qtool command run from the source tree ``tree`` (another checkout, e.g. a `git
    archive` of an older commit with its compiled kernels copied in) instead of the editable
    install, for before/after tables."""
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
            f"repr(f)]; sys.path.insert(0, {str(tree)!r}); sys.argv[0] = 'qtool'; "
            "from qtool.entry import main; main()")
    return [sys.executable, "-c", code]


def commands(src: Path, work: Path) -> list[tuple[str, list[str]]]:
    art = work / "art"
    return [
        ("quantize", QTOOL + ["quantize", str(src), str(art), "--force"]),
        ("verify", QTOOL + ["verify", str(art)]),
        ("dequantize", QTOOL + ["dequantize", str(art), str(work / "restored.safetensors")]),
        ("report", QTOOL + ["report", str(art)]),
        ("report --all", QTOOL + ["report", str(art), "--all"]),
        ("report json", QTOOL + ["report", str(art), "--format", "json"]),
        ("report csv", QTOOL + ["report", str(art), "--format", "csv"]),
        ("report markdown", QTOOL + ["report", str(art), "--format", "markdown"]),
        ("report html", QTOOL + ["report", str(art), "--format", "html"]),
        ("report --original", QTOOL + ["report", str(art), "--original", str(src)]),
        ("dry run", QTOOL + ["report", str(src)]),
    ]


def measure(counts: list[int], kind: str, shards: int, only: set[str] | None,
            name_len: int = 60) -> list[tuple[int, str, int, float, float, int]]:
    """Print (and return) count, command, peak RSS, bound, wall seconds, exit code."""
    found = []
    print(f"{'count':>9} {'command':<18} {'peak MB':>8} {'bound MB':>8} {'wall s':>7} "
          f"{'cpu s':>7} {'exit':>4}  verdict")
    for count in counts:
        name = (f"{kind}-{count}" + (f"-s{shards}" if shards else "")
                + (f"-n{name_len}" if name_len != 60 else ""))
        src_dir = DATA / name
        src = make(src_dir / ("ckpt" if shards else "model.safetensors"), count, kind,
                   name_len=name_len, shards=shards)
        work = DATA / (name + "-work")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        largest = 0 if kind == "empty" else 2 * 8 * 4
        bound = 2 * largest + BOUND_SLACK
        for label, argv in commands(src, work):
            if only and label not in only:
                continue
            if label == "dequantize":
                (work / "restored.safetensors").unlink(missing_ok=True)
            wall, peak, cpu, rc = measure_one(argv)
            ok = "ok" if peak <= bound and rc in (0, 1) else "NOT MET"
            print(f"{count:>9} {label:<18} {peak / MB:>8.0f} {bound / MB:>8.0f} {wall:>7.1f} "
                  f"{cpu:>7.1f} {rc:>4}  {ok}", flush=True)
            found.append((count, label, peak, bound, wall, rc))
        shutil.rmtree(work, ignore_errors=True)
    return found


def bench_section(target: Callable[[str, bool], None], count: int = 100_000) -> None:
    """`make bench`'s lines: the most used commands on ``count`` empty tensors, against the
    bound (the whole table: ``python bench/many_tensors.py measure``)."""
    print(f"very many tensors ({count:,} empty float32 tensors, names of 60 characters):")
    labels = {"quantize", "verify", "dequantize", "report", "report json"}
    for n, label, peak, bound, wall, rc in measure([count], "empty", 0, labels):
        target(f"{label} on {n:,} empty tensors: peak RSS {peak / MB:.0f} MB "
               f"(<= {bound / MB:.0f} MB), {wall:.1f} s", peak <= bound and rc == 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("out", type=Path)
    mk.add_argument("--count", type=int, required=True)
    mk.add_argument("--kind", choices=("empty", "tiny"), default="empty")
    mk.add_argument("--name-len", type=int, default=60)
    mk.add_argument("--shards", type=int, default=0)
    me = sub.add_parser("measure")
    me.add_argument("--counts", default="50000,100000,200000")
    me.add_argument("--kind", choices=("empty", "tiny"), default="empty")
    me.add_argument("--shards", type=int, default=0)
    me.add_argument("--name-len", type=int, default=60)
    me.add_argument("--only", default="", help="comma-separated command labels")
    me.add_argument("--tree", type=Path, help="run qtool from this source tree")
    args = ap.parse_args()
    if getattr(args, "tree", None) is not None:
        global QTOOL
        QTOOL = qtool_from(args.tree.resolve())
    if args.cmd == "make":
        print(make(args.out, args.count, args.kind, args.name_len, args.shards))
    else:
        only = set(args.only.split(",")) if args.only else None
        measure([int(c) for c in args.counts.split(",")], args.kind, args.shards, only,
                args.name_len)


if __name__ == "__main__":
    main()
