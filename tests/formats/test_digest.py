"""Digests (issue 11, section 2): BLAKE3 for every file, the algorithm named in the manifest,
SHA-256 (format_version 1) still verified, and a manifest that guards itself."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import blake3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from qtool.formats.manifest import ArtifactError, Manifest, seal
from tests.conftest import run, write_checkpoint

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "v1"


def _one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qtool: error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture
def grouped(tmp_path: Path) -> tuple[Path, Path]:
    """An asymmetric 4-bit group-128 artifact of a 16 x 256 tensor, and its source."""
    rng = np.random.default_rng(3)
    src = write_checkpoint(tmp_path / "m.safetensors",
                           {"w": rng.normal(0, 0.05, (16, 256)).astype(np.float32)})
    art = tmp_path / "art"
    run("quantize", src, art, "--scheme", "asymmetric", "-b", "4", "-g", "group",
        "--group-size", "128", "--source-digest", "-q")
    return src, art


def test_every_file_and_the_source_have_blake3_digests(grouped):
    src, art = grouped
    m = json.loads((art / "qtool.json").read_text())
    assert m["format_version"] == 2 and m["digest"] == "blake3"
    assert sorted(m["files"]) == sorted(p.name for p in art.iterdir() if p.name != "qtool.json")
    for name, info in m["files"].items():
        data = (art / name).read_bytes()
        assert info == {"size": len(data), "blake3": blake3.blake3(data).hexdigest()}
    raw = src.read_bytes()
    (entry,) = m["source"]["files"]
    n = int.from_bytes(raw[:8], "little")
    assert entry["blake3"] == blake3.blake3(raw).hexdigest()
    assert entry["header_blake3"] == blake3.blake3(raw[: 8 + n]).hexdigest()
    # The manifest's own digest: BLAKE3 of its canonical content (docs/FORMAT.md), computed
    # here independently of qtool.
    body = {k: v for k, v in m.items() if k != "manifest_digest"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert m["manifest_digest"] == blake3.blake3(canon.encode()).hexdigest()
    assert list(m)[-1] == "manifest_digest"


@pytest.mark.parametrize("name", ["art_sym8", "art_asym4"])
def test_format_1_artifacts_still_verify_with_sha256(tmp_path, name):
    art = tmp_path / name
    shutil.copytree(FIXTURES / name, art)
    m = json.loads((art / "qtool.json").read_text())
    assert m["format_version"] == 1 and "manifest_digest" not in m
    r = run("verify", art)
    assert r.stderr.startswith(f"{art}: ok: 3 files match their size and sha256;")
    run("report", art, "--verify", "--format", "json")
    out = tmp_path / "r.safetensors"
    run("dequantize", art, out, "--verify", "-q")
    restored = FIXTURES / f"restored_{name.split('_')[1]}.safetensors"
    assert out.read_bytes() == restored.read_bytes()
    # ...and SHA-256 is really checked: one flipped byte in the integers is named.
    p = art / m["shards"][0]
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x04
    p.write_bytes(data)
    r = run("verify", art, expect=2)
    # The digest of the bytes found is not echoed (issue 15), only the recorded one.
    assert f"{p}: sha256 differs from the manifest's" in r.stderr
    assert hashlib.sha256(data).hexdigest() not in r.stderr


def _edit(art: Path, old: str, new: str) -> None:
    """Edit qtool.json's text in place, as a user with an editor would (no resealing)."""
    p = art / "qtool.json"
    text = p.read_text()
    assert text.count(old) == 1, old
    p.write_text(text.replace(old, new))


def _all_commands_refuse(art: Path, tmp_path: Path, fragment: str) -> None:
    out = tmp_path / "restored.safetensors"
    for args in (("verify", art), ("dequantize", art, out, "--verify"),
                 ("report", art, "--verify"), ("dequantize", art, out), ("report", art)):
        _one_line_error(run(*args, expect=None), f"{art / 'qtool.json'}: ", fragment)
    assert not out.exists()


def test_group_size_128_to_129_is_caught(grouped, tmp_path):
    _, art = grouped
    before = (art / "qtool.json").read_bytes()
    _edit(art, '"group_size": 128', '"group_size": 129')
    after = (art / "qtool.json").read_bytes()
    diff = [a ^ b for a, b in zip(before, after, strict=True) if a != b]
    assert len(diff) == 1 and bin(diff[0]).count("1") == 1  # one bit
    _all_commands_refuse(art, tmp_path, "does not match its manifest_digest")


def test_changed_error_sq_cannot_turn_a_failing_gate_into_a_pass(grouped, tmp_path):
    _, art = grouped
    r = run("report", art, "--format", "json", "--fail-under-sqnr", "60", expect=1)
    assert "qtool: fail:" in r.stderr
    m = json.loads((art / "qtool.json").read_text())
    error_sq = m["tensors"][0]["metrics"]["error_sq"]
    _edit(art, f'"error_sq": {json.dumps(error_sq)}', f'"error_sq": {error_sq * 1e-9!r}')
    _all_commands_refuse(art, tmp_path, "does not match its manifest_digest")
    _one_line_error(run("report", art, "--fail-under-sqnr", "60", expect=None),
                    "manifest_digest")


def test_an_edit_that_keeps_the_meaning_is_caught_too(grouped, tmp_path):
    _, art = grouped
    text = (art / "qtool.json").read_text()
    # A number with an exponent: "1e-05" and "1E-05" differ in one bit and mean the same.
    match = re.search(r"\d(e)[-+]\d", text)
    assert match is not None
    i = match.start(1)
    (art / "qtool.json").write_text(text[:i] + "E" + text[i + 1:])
    _all_commands_refuse(art, tmp_path, "different bytes than qtool writes")


@settings(max_examples=300, deadline=None)
@given(bit=st.integers(0, 1 << 30))
def test_any_flipped_bit_of_a_manifest_is_caught(bit):
    m = Manifest.from_json(_SAMPLE_TEXT, "qtool.json")
    assert m.format_version == 2
    blob = bytearray(_SAMPLE_TEXT.encode())
    pos = bit % (len(blob) * 8)
    blob[pos // 8] ^= 1 << (pos % 8)
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        return  # the reader refuses such a file before parsing (Artifact.load)
    with pytest.raises(ArtifactError):
        Manifest.from_json(text, "qtool.json")


def _sample_manifest_text() -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(5)
        src = write_checkpoint(Path(d) / "s.safetensors", {
            "a.weight": rng.normal(0, 1e-4, (4, 64)).astype(np.float32),
            "b.weight": rng.normal(0, 1, (8, 32)).astype(np.float16),
            "b.bias": np.ones(8, np.float32)})
        run("quantize", src, Path(d) / "art", "-g", "group", "--group-size", "32", "-q")
        return (Path(d) / "art" / "qtool.json").read_text()


_SAMPLE_TEXT = _sample_manifest_text()


@pytest.mark.parametrize("key", ["group_size", "granularity", "bits", "scheme", "range"])
def test_a_missing_required_key_is_an_error_not_a_default(grouped, tmp_path, key):
    _, art = grouped
    m = json.loads((art / "qtool.json").read_text())
    del m["tensors"][0][key]
    (art / "qtool.json").write_text(seal(m))  # even a resealed manifest must not pass
    _all_commands_refuse(art, tmp_path, f"tensor entry 'w' has no '{key}'")


@pytest.mark.parametrize("key", ["digest", "manifest_digest", "index", "qtool_version"])
def test_a_missing_top_level_key_is_an_error(grouped, tmp_path, key):
    _, art = grouped
    m = json.loads((art / "qtool.json").read_text())
    del m[key]
    text = seal(m) if key not in ("digest", "manifest_digest") else json.dumps(m, indent=1)
    (art / "qtool.json").write_text(text)
    _all_commands_refuse(art, tmp_path, key)


def test_verify_checks_the_algorithm_the_manifest_names(grouped, tmp_path):
    """A manifest may name sha256: its files are checked with SHA-256 then."""
    _, art = grouped
    m = json.loads((art / "qtool.json").read_text())
    m["digest"] = "sha256"
    for name in m["files"]:
        data = (art / name).read_bytes()
        m["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (art / "qtool.json").write_text(seal(m))
    assert "match their size and sha256" in run("verify", art).stderr
    tensors = load_file(str(art / "m.scale.safetensors"))
    tensors["w"] = tensors["w"] * 2
    # (the sidecars' __metadata__ marks them as qtool's: kept, so that only the digest tells)
    save_file(tensors, str(art / "m.scale.safetensors"), metadata={"format": "qtool"})
    _one_line_error(run("report", art, "--verify", expect=None), "m.scale.safetensors: sha256")
    m["digest"] = "md5"
    (art / "qtool.json").write_text(json.dumps(m, indent=1) + "\n")
    _one_line_error(run("verify", art, expect=None), "unknown or missing digest algorithm 'md5'")
