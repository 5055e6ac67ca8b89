"""`qtool report --format html`: one self-contained page (no script, nothing from the
network), the charts and histograms it must hold, its size, and the page rendered in a real
headless browser (Debian's chromium), checked pixel by pixel for charts."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.conftest import run, write_checkpoint

RNG = np.random.default_rng(11)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _model(tmp_path, layers=2, rows=16):
    t = {"model.embed_tokens.weight": RNG.normal(0, 0.05, (64, 16)).astype(np.float32)}
    for i in range(layers):
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"):
            t[f"model.layers.{i}.{m}.weight"] = RNG.normal(0, 0.05, (rows, 16)).astype(
                np.float32)
        t[f"model.layers.{i}.norm.weight"] = np.ones(16, np.float32)
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = 2.0  # the worst tensor, row 3
    return write_checkpoint(tmp_path / "m.safetensors", t), t


def _svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, re.S)


def test_page_is_self_contained_and_holds_the_charts(tmp_path):
    src, t = _model(tmp_path)
    page = run("report", src, "-b", "4", "--format", "html").stdout
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    # The only URL is the SVG namespace, which is a name, not a fetch.
    assert set(re.findall(r"https?://[^\"' <)]+", page)) == {"http://www.w3.org/2000/svg"}
    svgs = _svgs(page)
    bars = [s for s in svgs if 'class="bars"' in s]
    heat = [s for s in svgs if 'class="heat"' in s]
    hists = [s for s in svgs if 'class="hist-svg"' in s]
    assert len(bars) == 2 and len(heat) == 2 and len(hists) == 3  # SQNR and bits; 3 worst
    # One bar per quantized tensor (the embedding is outside the heatmap, inside the bars).
    quantized = [n for n, w in t.items() if w.ndim == 2]
    assert bars[0].count("<rect") == len(quantized)
    assert heat[0].count("<rect") == len(quantized) - 1
    # The worst tensor's histogram comes first: the row with its largest |w|, and a 4-bit
    # grid: 16 levels in one path of strokes, spaced by that row's scale.
    doc = json.loads(run("report", src, "-b", "4", "--format", "json").stdout)
    worst = doc["groups"][0]["totals"]["worst"]["name"]
    row = int(np.argmax(np.abs(t[worst]).max(axis=1)))
    first = page.index('class="hist"')
    assert f"<b>{worst}</b>" in page[first:first + 200]
    assert f"row {row} of 16" in page[first:first + 400] and "original weights" in page[first:]
    d = re.search(r'class="grid" d="([^"]+)"', hists[0]).group(1)
    xs = [float(m) for m in re.findall(r"M([-\d.]+) ", d)]
    assert len(xs) == 16
    steps = np.diff(xs)
    assert np.allclose(steps, steps[0], atol=0.11)  # equal spacing, up to rounding to 0.1 px
    counts = [float(h) for h in re.findall(r'height="([\d.]+)" fill="#7a8fa6"', hists[0])]
    assert len(counts) == 80 and sum(c > 0 for c in counts) >= 3
    for needle in ("latency", "MAC area", "energy: total", "DRAM bytes per pass",
                   "float activations", "Horowitz"):
        assert needle in page, needle


def test_names_are_escaped(tmp_path):
    t = {"a<b>&\"c'.weight": RNG.normal(0, 1, (8, 8)).astype(np.float32)}
    src = write_checkpoint(tmp_path / "m.safetensors", t)
    page = run("report", src, "--format", "html").stdout
    assert "a<b>" not in page and "a&lt;b&gt;&amp;&quot;c&#x27;.weight" in page


def test_artifact_alone_draws_dequantized_values_and_says_so(tmp_path):
    src, _ = _model(tmp_path)
    out = tmp_path / "q"
    run("quantize", src, out, "-q", "-b", "4")
    page = run("report", out, "--format", "html").stdout
    assert "dequantized values (on the grid" in page and len(_svgs(page)) >= 5
    # Dequantized values lie on the grid: every non-empty bin holds a grid level.
    h = next(s for s in _svgs(page) if 'class="hist-svg"' in s)
    grid = [float(m) for m in re.findall(r"M([-\d.]+) ", re.search(r'd="([^"]+)"', h).group(1))]
    rects = re.findall(r'<rect x="([\d.]+)" y="[\d.]+" width="([\d.]+)" height="([\d.]+)"', h)
    for x, w, hgt in rects:
        if float(hgt) > 0:
            assert any(float(x) - 0.2 <= g <= float(x) + float(w) + 0.7 for g in grid)
    measured = run("report", out, "--original", src, "--format", "html").stdout
    assert "original weights" in measured


def test_size_grows_with_tensors_not_bytes(tmp_path):
    """The page's size is a fixed part plus a part per tensor: a 100 MB checkpoint of a few
    hundred tensors gives well under 5 MB (measured: see the report in docs/REPORT.md)."""
    small, _ = _model(tmp_path / "a" if (tmp_path / "a").mkdir() is None else None, rows=16)
    big, _ = _model(tmp_path / "b" if (tmp_path / "b").mkdir() is None else None, rows=4096)
    n = 9 + 4  # tensors of either
    s = len(run("report", small, "--format", "html").stdout.encode())
    b = len(run("report", big, "--format", "html").stdout.encode())
    assert b < s * 1.2  # 256 times the bytes, about the same page
    t = {f"model.layers.{i}.mlp.up_proj.weight": RNG.normal(0, 1, (8, 8)).astype(np.float32)
         for i in range(200)}
    path = tmp_path / "many.safetensors"
    save_file(t, str(path))
    many = len(run("report", path, "--format", "html").stdout.encode())
    per_tensor = (many - s) / (200 - n)
    assert per_tensor < 1500, per_tensor  # bytes per tensor
    assert many < 60_000 + 1500 * 200


def test_page_is_streamed_a_tensor_at_a_time(tmp_path):
    """With many tensors the page comes in small pieces (a table row, a bar, a heatmap cell
    each), never as a list of every row or one string (200,000 tensors are ~40 MB of HTML),
    and the CLI writes exactly those pieces."""
    from qtool.formats.native import Artifact
    from qtool.report.html import iter_html
    from qtool.report.model import ReportOptions, artifact_report, disk_bytes
    from qtool.report.weights import histograms

    n = 600
    t = {f"model.layers.{i // 3}.mlp.{('up', 'down', 'gate')[i % 3]}_proj.weight":
         RNG.normal(0, 1, (4, 8)).astype(np.float32) for i in range(n)}
    t["model.norm.weight"] = np.ones(8, np.float32)  # kept in float: a row of its own
    src = write_checkpoint(tmp_path / "m.safetensors", t)
    art = tmp_path / "q"
    run("quantize", src, art, "-q", "-b", "4")
    page = run("report", art, "--format", "html", "--fail-under-sqnr", "99", expect=1).stdout
    m = Artifact.open(art).manifest
    rep = artifact_report(art, list(m.tensors), disk=disk_bytes(m.source, m.files),
                          options=ReportOptions(fail_under_sqnr=99.0))
    pieces = list(iter_html(rep, *histograms(rep)))
    assert "".join(pieces) == page  # what the CLI wrote, in its batches of pieces
    assert page.count('<p class="bad">FAIL ') == n and page.count('class="hist"') == 3
    table = page[page.index('<table class="tensors">'):]
    rows = re.findall(r'<tr><td class="n">([^<]+)</td>', table)
    assert rows == [r.name for r in m.tensors] and sorted(rows) == sorted(t)  # every tensor
    # No piece longer than a histogram (80 bars and the grid), the totals table or the head
    # with its style sheet, whatever the number of tensors: the page is ~100 times as long.
    assert max(len(p) for p in pieces) < 10_000 and len(page) > 700_000
    # The table's rows, the two charts' bars and the two heatmaps' cells come one by one.
    assert len(pieces) >= (n + 1) + 2 * n + 2 * n
    assert sum(1 for p in pieces if p.startswith('<tr><td class="n">model.layers.')) == n


# --------------------------------------------------------------------------- in a browser


def _png_pixels(path) -> np.ndarray:
    """RGB(A) pixels of an 8-bit, non-interlaced PNG (what chromium writes), with numpy."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and interlace == 0 and colour in (2, 6)
            ch = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * ch)
    out = np.zeros((h, w * ch), np.int32)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        prev = out[y - 1] if y else np.zeros(w * ch, np.int32)
        if f == 0:
            cur = line
        elif f == 2:
            cur = (line + prev) & 255
        else:  # 1 (sub), 3 (average), 4 (Paeth): left-dependent, pixel by pixel
            cur = np.zeros(w * ch, np.int32)
            for x in range(w * ch):
                a = cur[x - ch] if x >= ch else 0
                b = prev[x]
                c = prev[x - ch] if x >= ch else 0
                if f == 1:
                    pred = a
                elif f == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                cur[x] = (line[x] + pred) & 255
        out[y] = cur
    return out.reshape(h, w, ch)[:, :, :3]


def _chromium(*args: str, tmp_path) -> subprocess.CompletedProcess:
    # The flags of docs (machine notes): no sandbox as root, no background networking (this
    # machine's network is closed), a fresh profile.
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine: the page is not "
                    "rendered (apt-get install -y chromium; .ci/run installs it)")
def test_page_renders_in_headless_chromium(tmp_path):
    src, _ = _model(tmp_path)
    page = tmp_path / "report.html"
    page.write_text(run("report", src, "-b", "4", "--format", "html").stdout, encoding="utf-8")
    shot = tmp_path / "shot.png"
    r = _chromium(f"--screenshot={shot}", "--window-size=1200,900", page.as_uri(),
                  tmp_path=tmp_path)
    assert shot.is_file(), r.stderr[-2000:]
    px = _png_pixels(shot)
    assert px.shape == (900, 1200, 3)
    # Not blank: the heading, the heatmap and the bars are drawn in the first screen. The
    # bar chart's colours (green #2e9b57 for SQNR ≥ 30 dB, yellow #e0a100 below, red
    # #d1344b below 20) cover a good part of the middle of the page.
    assert px.std() > 20
    bars = np.zeros(px.shape[:2], bool)
    for rgb in ([0x2e, 0x9b, 0x57], [0xe0, 0xa1, 0x00], [0xd1, 0x34, 0x4b]):
        bars |= np.abs(px - rgb).sum(axis=2) < 40
    assert bars[150:900].sum() > 5000, bars.sum()
    assert px[:80].std() > 10  # the heading's text
    dom = _chromium("--dump-dom", page.as_uri(), tmp_path=tmp_path).stdout
    assert dom.count("<svg") == 7 and "Worst tensors" in dom and "<script" not in dom
