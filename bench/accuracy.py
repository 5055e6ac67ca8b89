"""`make bench`, weight-space accuracy: SQNR at a given bits per weight for --range minmax,
mse and search, for mixed precision (--target-bits) and for double-quantized group scales,
on a heavy-tailed synthetic checkpoint in transformer shapes; the cost of --range search and
of --target-bits.

The checkpoint (bench/_data/heavy/): one Llama-like layer at hidden 512 / MLP 1408 and an
embedding of 1024 rows, 3.7M weights, Student-t draws whose tail weight differs per tensor kind
(attention q/k nu=3, v/o nu=6, MLP nu=4, embedding nu=5) with a log-normal scale per row, as
trained weights have. Bits per weight are the lean-artifact definition
(``qtool.core.shapes.stored_bytes``: integers, scales as stored, zero points); SQNR is
measured on the file `qtool dequantize` restores, read back with the safetensors library
(the double-quantization comparison: in memory, plus two rows through the CLI).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from qtool.core.schemes import QuantSpec
from qtool.core.shapes import stored_bytes

TAILS = {"q_proj": 3.0, "k_proj": 3.0, "v_proj": 6.0, "o_proj": 6.0, "gate_proj": 4.0,
         "up_proj": 4.0, "down_proj": 4.0, "embed_tokens": 5.0}


def heavy_checkpoint(path: Path, shapes: dict[str, tuple]) -> Path:
    if path.exists():
        return path
    rng = np.random.default_rng(11)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            out[name] = np.ones(shape, np.float32)
            continue
        nu = next(v for k, v in TAILS.items() if k in name)
        rows = np.exp(rng.normal(0, 0.3, (shape[0], 1)))
        out[name] = (rng.standard_t(nu, shape) * 0.02 * rows).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"format": "pt"})
    return path


def spec_of(rec: dict) -> QuantSpec:
    keys = ("scheme", "bits", "granularity", "group_size", "range", "percentile",
            "scale_dtype", "scale_bits")
    return QuantSpec(**{k: rec[k] for k in keys if k in rec})


def measure(src: Path, art: Path, restored: Path, run: Callable[[list[str]], float]
            ) -> tuple[float, float, float]:
    """(bits per weight, SQNR dB of all quantized tensors, worst tensor's SQNR dB)."""
    run(["dequantize", str(art), str(restored), "-q", "--force"])
    recs = [t for t in json.loads((art / "qtool.json").read_text())["tensors"]
            if not t.get("passthrough")]
    bits = sum(8 * stored_bytes(tuple(t["shape"]), spec_of(t)) for t in recs)
    n = sum(math.prod(t["shape"]) for t in recs)
    sig = err = 0.0
    worst = math.inf
    with safe_open(str(src), "numpy") as f, safe_open(str(restored), "numpy") as g:
        for t in recs:
            w = f.get_tensor(t["name"]).astype(np.float64)
            e = float(np.sum((w - g.get_tensor(t["name"])) ** 2))
            s = float(np.sum(w * w))
            sig, err = sig + s, err + e
            worst = min(worst, 10 * math.log10(s / e))
    return bits / n, 10 * math.log10(sig / err), worst


def weight_space(src: Path, work: Path, run: Callable[[list[str]], float],
                 target: Callable[[str, bool], None]) -> None:
    """The accuracy table and the cost of --range search (end to end and in the core)."""
    asym = ["--scheme", "asymmetric"]
    rows: list[tuple[str, list[str]]] = []
    for bits in (4, 3):
        # mse at 4 bits only: with groups of 32 it costs ~10x minmax (100 passes per group).
        for rng in ("minmax", "mse", "search") if bits == 4 else ("minmax", "search"):
            rows.append((f"{bits}-bit g32 {rng}", [*asym, "--bits", str(bits), "-g", "group",
                                                   "--group-size", "32", "--range", rng]))
        uniform = 8 * stored_bytes((1, 4096), QuantSpec("asymmetric", bits, "group", 32)) / 4096
        for rng in ("minmax", "search") if bits == 4 else ("search",):
            rows.append((f"mixed --target-bits {uniform:g} {rng}",
                         [*asym, "--target-bits", f"{uniform:g}", "--range", rng]))
        # The same budget with 8-bit scale codes on every group candidate (--scale-bits 8).
        rows.append((f"mixed --target-bits {uniform:g} search, scale codes",
                     [*asym, "--target-bits", f"{uniform:g}", "--range", "search",
                      "--scale-bits", "8"]))
        if bits == 4:  # the same budget with a floor that guards the worst tensor
            rows.append((f"mixed --target-bits {uniform:g} --target-sqnr 20 search",
                         [*asym, "--target-bits", f"{uniform:g}", "--target-sqnr", "20",
                          "--range", "search"]))
    # At the size of uniform 4-bit g32 with scale codes (rounded up to 3 decimals, so that
    # the uniform setting is one the allocator can pick): uniform, mixed, mixed with codes.
    coded = coded_budget(src)
    rows.append(("4-bit g32 search, scale codes", [*asym, "--bits", "4", "-g", "group",
                                                   "--group-size", "32", "--range", "search",
                                                   "--scale-bits", "8"]))
    for label, extra in (("", []), (", scale codes", ["--scale-bits", "8"])):
        rows.append((f"mixed --target-bits {coded} search{label}",
                     [*asym, "--target-bits", coded, "--range", "search", *extra]))
    print(f"weight-space accuracy, asymmetric, on a heavy-tailed checkpoint in transformer "
          f"shapes ({src.stat().st_size / 1e6:.0f} MB, Student-t nu 3-6 by tensor kind):")
    print(f"  {'setting':50s} {'bits/w':>7s} {'SQNR dB':>8s} {'worst dB':>9s} {'time s':>7s}")
    got: dict[str, tuple[float, float, float, float]] = {}
    for label, args in rows:
        art = work / "acc"
        secs = run(["quantize", str(src), str(art), "-q", "--force", *args])
        bpw, db, worst = measure(src, art, work / "acc.safetensors", run)
        got[label] = (bpw, db, worst, secs)
        print(f"  {label:50s} {bpw:7.3f} {db:8.2f} {worst:9.2f} {secs:7.2f}")
    s4, m4, mm4 = got["4-bit g32 search"], got["4-bit g32 mse"], got["4-bit g32 minmax"]
    target(f"4-bit asymmetric g32: search {s4[1]:.2f} dB > mse {m4[1]:.2f} dB > minmax "
           f"{mm4[1]:.2f} dB", s4[1] > m4[1] > mm4[1])
    mix = got["mixed --target-bits 5.125 search"]
    target(f"mixed precision at 5.125 bits/w (search): {mix[1]:.2f} dB >= uniform 4-bit g32 "
           f"search {s4[1]:.2f} dB, within the budget ({mix[0]:.3f})",
           mix[1] >= s4[1] and mix[0] <= 5.125)
    for budget in ("5.125", "4.09375", coded):
        fl, co = got[f"mixed --target-bits {budget} search"], \
            got[f"mixed --target-bits {budget} search, scale codes"]
        target(f"mixed precision at {budget} bits/w (search): scale codes {co[1]:.2f} dB "
               f"(worst {co[2]:.2f}) > float scales {fl[1]:.2f} dB (worst {fl[2]:.2f}), "
               f"within the budget ({co[0]:.3f})", co[1] > fl[1] and co[0] <= float(budget))
    uni = got["4-bit g32 search, scale codes"]
    co = got[f"mixed --target-bits {coded} search, scale codes"]
    target(f"mixed precision with scale codes at {coded} bits/w: {co[1]:.2f} dB >= uniform "
           f"4-bit g32 search with codes {uni[1]:.2f} dB at {uni[0]:.3f}", co[1] >= uni[1])
    plain, weighted = weighting(src)
    print(f"  4-bit g32 search, plain squared error {plain:.2f} dB; with k-quants' weights "
          f"(rms + |x|) {weighted:.2f} dB (qtool fits the plain error)")
    ratio_cli = s4[3] / mm4[3]
    print(f"  --range search / minmax, end to end (4-bit g32): {ratio_cli:.2f}x; --range mse "
          f"/ minmax: {m4[3] / mm4[3]:.1f}x")
    core = core_ratio(src)
    print(f"  --range search / minmax in the core (in memory, 1 thread, best of 3): "
          f"{core[0]:.2f}x (search {core[1]:.3f} s, minmax {core[2]:.3f} s; the C kernel, "
          "search's fit included)")
    target(f"--range search costs {core[0]:.2f}x --range minmax in the core (<= 3x)",
           core[0] <= 3.0)


def coded_budget(src: Path) -> str:
    """Bits per weight of uniform 4-bit asymmetric g32 with scale codes on ``src``'s 2-D
    tensors, rounded up to 3 decimals (as a --target-bits value)."""
    spec = QuantSpec("asymmetric", 4, "group", 32, scale_bits=8)
    with safe_open(str(src), "numpy") as f:
        shapes = [tuple(f.get_slice(k).get_shape()) for k in f.keys()]
    shapes = [s for s in shapes if len(s) == 2]
    bpw = sum(8 * stored_bytes(s, spec) for s in shapes) / sum(math.prod(s) for s in shapes)
    return f"{math.ceil(bpw * 1000) / 1000:.3f}"


def weighting(src: Path) -> tuple[float, float]:
    """SQNR of all 2-D tensors at 4-bit asymmetric g32 fitted unweighted and weighted."""
    from qtool.core.fit import fit_search

    out = []
    for weighted in (False, True):
        sig = err = 0.0
        with safe_open(str(src), "numpy") as f:
            for k in f.keys():
                w = f.get_tensor(k)
                if w.ndim != 2:
                    continue
                x = w.reshape(-1, 32)
                fit = fit_search(x, 4, "asymmetric", weighted=weighted)
                q = np.clip(np.rint(x / fit.scale[:, None]) + fit.zero_point[:, None], 0, 15)
                w_hat = (q - fit.zero_point[:, None]) * fit.scale[:, None]
                sig += float(np.sum(x.astype(np.float64) ** 2))
                err += float(np.sum((x.astype(np.float64) - w_hat) ** 2))
        out.append(10 * math.log10(sig / err))
    return out[0], out[1]


def core_ratio(src: Path) -> tuple[float, float, float]:
    from qtool.core.quant import quantize

    with safe_open(str(src), "numpy") as f:
        ws = [f.get_tensor(k) for k in f.keys()]
    ws = [w for w in ws if w.ndim == 2]

    def once(rng: str) -> float:
        spec = QuantSpec("asymmetric", 4, "group", 32, range=rng)
        t0 = time.perf_counter()
        for w in ws:
            quantize(w, spec)
        return time.perf_counter() - t0

    # Interleaved, so that a busy neighbour slows both sides alike; the best round counts.
    rounds = [(once("minmax"), once("search")) for _ in range(3)]
    mm, se = min(r[0] for r in rounds), min(r[1] for r in rounds)
    return se / mm, se, mm


def mixed_cost(src: Path, work: Path, run: Callable[[list[str]], float],
               target: Callable[[str, bool], None]) -> None:
    """--target-bits on the 1 GiB checkpoint against a plain low-bit quantize."""
    plain_args = ["--scheme", "asymmetric", "--bits", "4", "-g", "group", "--group-size", "32"]
    plain = run(["quantize", str(src), str(work / "p"), "-q", "--force", *plain_args])
    mixed = run(["quantize", str(src), str(work / "m"), "-q", "--force", "--scheme",
                 "asymmetric", "--target-bits", "4.5"])
    print(f"mixed precision on the 1 GiB float32 checkpoint: quantize --target-bits 4.5 "
          f"{mixed:.2f} s, plain 4-bit g32 quantize {plain:.2f} s: {mixed / plain:.2f}x "
          "(42 candidates per tensor, each measured on a seeded sample of 2^17 values)")
    target(f"--target-bits costs {mixed / plain:.2f}x a plain quantize on 1 GiB (<= 4x)",
           mixed <= 4 * plain)


def double_quantization(src: Path, work: Path, run: Callable[[list[str]], float],
                        target: Callable[[str, bool], None]) -> None:
    """Issue 13 section 3: group scales as 8-bit codes x one float32 per row (double
    quantization, qtool.core.double_quant) against plain float16 scales, at near-equal bits
    per weight (sidecars included), minmax and search ranges, 4 and 3 bits asymmetric. In
    memory, with the scales as stored: q comes from the rounded (up) scale in both cases."""
    from qtool.core.double_quant import dequantize_dq, quantize_dq, stored_bytes_dq
    from qtool.core.quant import dequantize, quantize

    with safe_open(str(src), "numpy") as f:
        ws = {k: f.get_tensor(k) for k in f.keys()}
    ws = {k: w for k, w in ws.items() if w.ndim == 2}
    n = sum(w.size for w in ws.values())

    def one(spec: QuantSpec, dq: bool) -> tuple[float, float, float]:
        bits = sig = err = 0.0
        worst = math.inf
        for w in ws.values():
            if dq:
                q, p = quantize_dq(w, spec)
                w_hat = dequantize_dq(q, p, spec.group_size)
                bits += 8 * stored_bytes_dq(w.shape, spec)
            else:
                t = quantize(w, spec)
                w_hat = dequantize(t.data, t.scale, t.zero_point, w.shape, spec, np.float32)
                bits += 8 * stored_bytes(w.shape, spec)
            w64 = w.astype(np.float64)
            s, e = float(np.sum(w64 * w64)), float(np.sum((w64 - w_hat) ** 2))
            sig, err, worst = sig + s, err + e, min(worst, 10 * math.log10(s / e))
        return bits / n, 10 * math.log10(sig / err), worst

    def matched(bits: int, target_bpw: float) -> int:
        """The largest group size whose float16-scale bits per weight are >= target_bpw: the
        plain setting at equal or slightly more bits than a double-quantized one."""
        g = 256
        while g > 1 and sum(8 * stored_bytes(w.shape, QuantSpec(
                "asymmetric", bits, "group", g, scale_dtype="float16"))
                for w in ws.values()) / n < target_bpw:
            g -= 1
        return g

    print("double quantization of group scales (8-bit codes x one float32 per row) against "
          "float16 scales, asymmetric, same checkpoint, in memory (4-bit g32 also through the "
          "CLI):")
    print(f"  {'setting':62s} {'bits/w':>7s} {'SQNR dB':>8s} {'worst dB':>9s}")
    verdicts = []
    for bits in (4, 3):
        for rng in ("minmax", "search"):
            def row(g: int, is_dq: bool, note: str = "", bits: int = bits, rng: str = rng
                    ) -> tuple[float, float, float, int]:
                spec = QuantSpec("asymmetric", bits, "group", g, range=rng,
                                 scale_dtype="float32" if is_dq else "float16")
                bpw, db, worst = one(spec, is_dq)
                kind = "8-bit codes x f32/row" if is_dq else "float16 scales" + note
                print(f"  {f'{bits}-bit g{g} {rng}, {kind}':62s} {bpw:7.3f} {db:8.2f} "
                      f"{worst:9.2f}")
                return bpw, db, worst, g

            for g in (32, 64, 128):
                row(g, False)
            pairs = []
            for g in (16, 32, 64):
                d = row(g, True)
                pairs.append((d, row(matched(bits, d[0]), False, " (bits >= the row above)")))
            verdicts.append((bits, rng, pairs))
            if bits == 4:  # the same through the CLI, measured on the files it writes
                art = work / "acc-dq"
                run(["quantize", str(src), str(art), "-q", "--force", "--scheme", "asymmetric",
                     "--bits", "4", "-g", "group", "--group-size", "32", "--range", rng,
                     "--scale-bits", "8"])
                bpw, db, worst = measure(src, art, work / "acc-dq.safetensors", run)
                print(f"  {f'4-bit g32 {rng}, qtool quantize --scale-bits 8 (files)':62s} "
                      f"{bpw:7.3f} {db:8.2f} {worst:9.2f}")
                proto = pairs[1][0]
                target(f"--scale-bits 8 end to end (4-bit g32 {rng}) is the measured prototype: "
                       f"{db:.2f} dB at {bpw:.3f} bits/w",
                       abs(db - proto[1]) < 0.005 and abs(bpw - proto[0]) < 1e-9)
    wins = 0
    for bits, rng, pairs in verdicts:
        line, won = dq_verdict(bits, rng, pairs)
        wins += won
        print("  " + line)
    target(f"double quantization beats float16 scales at equal or fewer bits per weight in "
           f"{wins} of {len(verdicts)} settings (4/3-bit x minmax/search)", wins == len(verdicts))


def dq_verdict(bits: int, rng: str, pairs: list[tuple[tuple, tuple]]) -> tuple[str, bool]:
    """One line per setting: each double-quantized point against the float16-scale point at
    equal or slightly more bits (the largest group size that costs as much); quoted is the
    pair with the smallest margin, so "pays off" means every pair is won."""
    margins = [(d[1] - p[1], d, p) for d, p in pairs]
    m, d, p = min(margins, key=lambda t: t[0])
    won = all(mm > 0 and dd[0] <= pp[0] for mm, dd, pp in margins)
    word = "pays off" if won else "does not pay off"
    return (f"{bits}-bit {rng}: double quantization {word}: {d[1]:.2f} dB at {d[0]:.3f} bits "
            f"(g{d[3]}) vs {p[1]:.2f} dB at {p[0]:.3f} bits (float16 g{p[3]}), the smallest of "
            f"the margins {', '.join(f'{mm:+.2f}' for mm, _, _ in margins)} dB "
            f"(g{'/'.join(str(dd[3]) for _, dd, _ in margins)})"), won
