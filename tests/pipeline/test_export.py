"""`qtool export --to compressed-tensors`, `dequantize` of compressed-tensors folders and
`report --against`, run as a user runs them (torch-free; the real clients are in
tests_interop/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qtool.core import packing
from qtool.formats import compressed_tensors_layout as L
from tests.conftest import header, run

RNG = np.random.default_rng(7)


def tensors() -> dict[str, np.ndarray]:
    def w(r: int, c: int) -> np.ndarray:
        return RNG.normal(0, 0.05, (r, c)).astype(np.float32)

    return {"model.embed_tokens.weight": w(32, 64),
            "model.layers.0.self_attn.q_proj.weight": w(64, 64),
            "model.layers.0.mlp.up_proj.weight": w(96, 64),
            "model.layers.0.mlp.odd.weight": w(8, 40),      # 40 columns: a short last group
            "model.layers.0.input_layernorm.weight": np.ones(64, np.float32),
            "lm_head.weight": w(32, 64)}


def model_folder(root: Path, shards: int = 1, positive: bool = False) -> Path:
    root.mkdir(parents=True)
    t = {k: np.abs(v) for k, v in tensors().items()} if positive else tensors()
    if shards == 1:
        save_file(t, str(root / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(t)
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: t[n] for n in part}, str(root / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (root / "tokenizer.json").write_text('{"model": {}}')
    (root / "generation_config.json").write_text('{"do_sample": false}')
    return root


def weights_of(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def artifact_arrays(art: Path) -> tuple[dict, dict, dict]:
    return (weights_of_named(art, ""), weights_of_named(art, ".scale"),
            weights_of_named(art, ".zero_point"))


def weights_of_named(art: Path, kind: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(art.glob(f"*{kind}.safetensors")):
        if kind or not f.name.endswith((".scale.safetensors", ".zero_point.safetensors")):
            out.update(load_file(f))
    return out


def test_manifest_records_the_model_folder_and_the_artifact_holds_no_copy(tmp_path):
    src = model_folder(tmp_path / "m")
    run("quantize", src, tmp_path / "art", "-q")
    doc = json.loads((tmp_path / "art" / "qtool.json").read_text())
    folder = doc["source"]["model_folder"]
    assert folder["path"] == str(src.resolve())
    assert [f["name"] for f in folder["files"]] == ["config.json", "generation_config.json",
                                                   "tokenizer.json"]
    assert folder["files"][0]["size"] == (src / "config.json").stat().st_size
    assert not (tmp_path / "art" / "config.json").exists()
    assert not (tmp_path / "art" / "tokenizer.json").exists()


@pytest.mark.parametrize("args, fmt, symmetric", [
    (["--scheme", "symmetric"], "int-quantized", True),
    (["--scheme", "gnmt"], "int-quantized", True),
    (["--scheme", "asymmetric", "--granularity", "group", "--group-size", "32"],
     "int-quantized", False),
    (["--scheme", "symmetric", "--bits", "4", "--granularity", "group", "--group-size", "16"],
     "pack-quantized", True),
    (["--scheme", "asymmetric", "--bits", "4"], "pack-quantized", False),
    (["--scheme", "symmetric-unsigned", "--bits", "8", "--granularity", "tensor"],
     "int-quantized", False),
])
def test_export_layout_and_values(tmp_path, args, fmt, symmetric):
    src = model_folder(tmp_path / "m", positive="symmetric-unsigned" in args)
    art, out = tmp_path / "art", tmp_path / "out"
    run("quantize", src, art, "-q", *args)
    r = run("export", art, out, "--to", "compressed-tensors")
    assert "model.layers.0.input_layernorm" not in r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json"]
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 64
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["quantization_status"] == "compressed"
    groups = list(qc["config_groups"].values())
    (group,) = [g for g in groups if any("q_proj" in t for t in g["targets"])]
    assert group["format"] == fmt and group["weights"]["symmetric"] is symmetric
    # an embedding is int-quantized at any width (transformers cannot load a packed one)
    (emb,) = [g for g in groups if any("embed_tokens" in t for t in g["targets"])]
    assert emb["format"] == "int-quantized" and len(groups) == (2 if fmt != emb["format"] else 1)
    got = weights_of(out)
    restored = tmp_path / "restored.safetensors"
    run("dequantize", art, restored, "-q")
    want = load_file(restored)
    q, scale, zp = artifact_arrays(art)
    bits = 4 if "4" in args else 8
    module = "model.layers.0.self_attn.q_proj"
    if bits == 8:
        ct_q = got[f"{module}.weight"]
        assert ct_q.dtype == np.int8
        # the integers as qtool stores them, moved into int8 for the unsigned schemes
        shift = 0 if symmetric else 128
        np.testing.assert_array_equal(ct_q.astype(np.int16) + shift, q[f"{module}.weight"])
    else:
        assert got[f"{module}.weight_packed"].dtype == np.int32
        assert got[f"{module}.weight_shape"].tolist() == [64, 64]
        ct_q = L.unpack_from_int32(got[f"{module}.weight_packed"], 4, (64, 64))
        mine = packing.unpack(q[f"{module}.weight"], 4, 64, symmetric)
        np.testing.assert_array_equal(ct_q.astype(np.int16) + (0 if symmetric else 8), mine)
    np.testing.assert_array_equal(got[f"{module}.weight_scale"].reshape(-1),
                                  scale[f"{module}.weight"].reshape(-1))
    assert (f"{module}.weight_zero_point" in got) is not symmetric
    emb_q = got["model.embed_tokens.weight"]
    assert emb_q.dtype == np.int8 and emb_q.shape == (32, 64)
    assert int(emb_q.min()) >= -(1 << (bits - 1)) and int(emb_q.max()) < 1 << (bits - 1)
    # The library's formula (q - zp) * s on the exported tensors gives qtool dequantize's
    # values bit for bit, for every quantized module.
    for name in want:
        mod = name.removesuffix(".weight")
        if f"{mod}.weight_scale" not in got:
            continue
        s = got[f"{mod}.weight_scale"].astype(np.float32)
        if f"{mod}.weight_packed" in got:
            rows, cols = got[f"{mod}.weight_shape"].tolist()
            qq = L.unpack_from_int32(got[f"{mod}.weight_packed"], bits, (rows, cols))
        else:
            qq = got[f"{mod}.weight"]
            rows, cols = qq.shape
        z = got.get(f"{mod}.weight_zero_point")
        if z is not None and z.dtype == np.int32:  # packed along the rows
            z = L.unpack_from_int32(z, bits, (rows, s.shape[1]), packed_dim=0)
        x = qq.astype(np.float32)
        g = cols // s.shape[1] if s.ndim == 2 else cols
        x = x.reshape(rows, -1, g) if s.ndim == 2 else x
        zz = 0 if z is None else (z.astype(np.float32)[:, :, None] if s.ndim == 2
                                  else z.astype(np.float32))
        ss = s[:, :, None] if s.ndim == 2 else s
        values = ((x - zz) * ss).reshape(rows, cols)
        assert values.view(np.uint32).tobytes() == want[name].view(np.uint32).tobytes(), name


def test_short_last_group_is_written_dequantized_with_a_warning(tmp_path):
    src = model_folder(tmp_path / "m")
    run("quantize", src, tmp_path / "art", "-q", "--bits", "4", "--granularity", "group",
        "--group-size", "32")
    r = run("export", tmp_path / "art", tmp_path / "out", "--to", "compressed-tensors")
    warning = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert len(warning) == 1 and "'model.layers.0.mlp.odd.weight'" in warning[0]
    assert "not a multiple of the group size 32" in warning[0]
    got = weights_of(tmp_path / "out")
    run("dequantize", tmp_path / "art", tmp_path / "r.safetensors", "-q")
    want = load_file(tmp_path / "r.safetensors")["model.layers.0.mlp.odd.weight"]
    odd = got["model.layers.0.mlp.odd.weight"]
    assert odd.dtype == np.float32 and np.array_equal(odd, want)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert len(targets) == 4 and not any("odd" in t for t in targets)


@pytest.mark.parametrize("config, names, tied", [
    ({"tie_word_embeddings": True, "architectures": ["LlamaForCausalLM"]},
     ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"],
     ["model.embed_tokens.weight"]),
    ({"tie_word_embeddings": True, "architectures": ["GPT2LMHeadModel"]},
     ["transformer.wte.weight", "transformer.wpe.weight"], ["transformer.wte.weight"]),
    ({"tie_word_embeddings": True, "architectures": ["BertForMaskedLM"]},
     ["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight"],
     ["bert.embeddings.word_embeddings.weight"]),
    # a bare model class has no output layer to share the weight with
    ({"tie_word_embeddings": True, "architectures": ["BertModel"]},
     ["embeddings.word_embeddings.weight"], []),
    ({"tie_word_embeddings": False, "architectures": ["LlamaForCausalLM"]},
     ["model.embed_tokens.weight"], []),
    # config.json silent: a stored output layer means untied, none means keep it float
    ({}, ["model.embed_tokens.weight", "lm_head.weight"], []),
    ({}, ["model.embed_tokens.weight"], ["model.embed_tokens.weight"]),
])
def test_which_embeddings_are_tied(config, names, tied):
    from qtool.pipeline.export import tied_embeddings
    assert sorted(tied_embeddings(names, names, config)) == tied


def test_a_tied_embedding_is_exported_dequantized(tmp_path):
    """The output layer shares a tied input embedding: exported quantized, the Linear would be
    handed int8 values, so it is written dequantized, equal to `dequantize`'s output."""
    src = model_folder(tmp_path / "m")
    (src / "model.safetensors").unlink()
    t = tensors()
    del t["lm_head.weight"], t["model.layers.0.mlp.odd.weight"]
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "tie_word_embeddings": True}))
    run("quantize", src, tmp_path / "art", "-q")
    r = run("export", tmp_path / "art", tmp_path / "out", "--to", "compressed-tensors")
    warning = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert len(warning) == 1 and "'model.embed_tokens.weight'" in warning[0]
    assert "tie_word_embeddings" in warning[0]
    run("dequantize", tmp_path / "art", tmp_path / "r.safetensors", "-q")
    want = load_file(tmp_path / "r.safetensors")
    got = weights_of(tmp_path / "out")
    emb = got["model.embed_tokens.weight"]
    assert emb.dtype == np.float32
    assert emb.tobytes() == want["model.embed_tokens.weight"].tobytes()
    assert not any(k.startswith("model.embed_tokens.weight_") for k in got)
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == np.int8
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert len(targets) == 2 and not any("embed_tokens" in t for t in targets)


def test_sharded_export_mirrors_the_source(tmp_path):
    src = model_folder(tmp_path / "m", shards=3)
    run("quantize", src, tmp_path / "art", "-q", "--bits", "4", "--granularity", "group",
        "--group-size", "8")
    run("export", tmp_path / "art", tmp_path / "out", "--to", "compressed-tensors")
    out = tmp_path / "out"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == sorted(p.name for p in src.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name, fname in index["weight_map"].items():
        assert name in header(out / fname)
    assert sum(len(header(out / f)) - 1 for f in shards) == len(index["weight_map"])
    # each module's tensors in the shard its source weight was in
    src_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    for name, fname in index["weight_map"].items():
        module = name.rpartition(".")[0]
        assert src_map.get(f"{module}.weight", src_map.get(name)) == fname
    run("dequantize", out, tmp_path / "restored", "-q")
    run("dequantize", tmp_path / "art", tmp_path / "restored_native", "-q")
    a, b = weights_of(tmp_path / "restored"), weights_of(tmp_path / "restored_native")
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_export_refusals(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file(tensors(), str(plain / "w.safetensors"))
    run("quantize", plain / "w.safetensors", tmp_path / "art", "-q")
    r = run("export", tmp_path / "art", tmp_path / "out", "--to", "compressed-tensors",
            expect=2)
    assert "records no model folder" in r.stderr and "--model-dir" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    r = run("export", tmp_path / "art", tmp_path / "out", "--to", "compressed-tensors",
            "--model-dir", plain, expect=2)
    assert "no config.json" in r.stderr and not (tmp_path / "out").exists()
    (plain / "config.json").write_text('{"model_type": "llama"}')
    run("export", tmp_path / "art", tmp_path / "out", "--to", "compressed-tensors",
        "--model-dir", plain)
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    r = run("export", tmp_path / "art", tmp_path / "out", "--to", "compressed-tensors",
            "--model-dir", plain, expect=2)
    assert "not empty" in r.stderr
    run("export", tmp_path / "art", tmp_path / "out", "--to", "compressed-tensors",
        "--model-dir", plain, "--force")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = run("export", tmp_path / "art", other, "--to", "compressed-tensors",
            "--model-dir", plain, "--force", expect=2)
    assert "replaces only those" in r.stderr and (other / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "other", "out", "plain"]


def test_report_against_the_original(tmp_path):
    src = model_folder(tmp_path / "m")
    run("quantize", src, tmp_path / "art", "-q", "--bits", "4", "--granularity", "group",
        "--group-size", "16")
    run("export", tmp_path / "art", tmp_path / "out", "--to", "compressed-tensors")
    native = json.loads(run("report", tmp_path / "art", "--against", src, "--format",
                            "json").stdout)
    ct = json.loads(run("report", tmp_path / "out", "--against", src, "--format",
                        "json").stdout)
    recorded = json.loads(run("report", tmp_path / "art", "--format", "json").stdout)
    t_native = {t["name"]: t for t in native["tensors"]}
    t_ct = {t["name"]: t for t in ct["tensors"]}
    t_rec = {t["name"]: t for t in recorded["tensors"]}
    name = "model.layers.0.mlp.up_proj.weight"
    orig = load_file(src / "model.safetensors")[name].astype(np.float64)
    run("dequantize", tmp_path / "art", tmp_path / "r.safetensors", "-q")
    err = load_file(tmp_path / "r.safetensors")[name].astype(np.float64) - orig
    for t in (t_native[name], t_ct[name], t_rec[name]):
        m = t["results"]["artifact"]
        assert m["mse"] == pytest.approx(np.mean(err ** 2), rel=1e-9)
        assert m["max_abs_error"] == pytest.approx(np.abs(err).max(), rel=1e-12)
        assert m["sqnr_db"] == pytest.approx(10 * np.log10((orig ** 2).sum() / (err ** 2).sum()),
                                             rel=1e-9)
    # bytes really stored in the compressed-tensors folder: int32 words, F32 scales, I64 shape
    assert t_ct[name]["results"]["artifact"]["quantized_bytes"] == 96 * 8 * 4 + 96 * 4 * 4 + 16
    assert t_ct[name]["results"]["artifact"]["bits"] == 4
    # Without --against a compressed-tensors folder is not a float checkpoint to dry-run.
    r = run("report", tmp_path / "out", expect=2)
    assert r.stderr.strip() == (f"qtool: error: {tmp_path / 'out'} is a compressed-tensors "
                                "model folder; give --against ORIGINAL to measure it")


@pytest.mark.parametrize("change, message", [
    (lambda qc, t: qc["config_groups"]["group_0"].update(format="float-quantized"),
     "format 'float-quantized' is not supported"),
    (lambda qc, t: t.pop("model.layers.0.mlp.up_proj.weight_scale"),
     "has no model.layers.0.mlp.up_proj.weight_scale beside it"),
    (lambda qc, t: t.update({"model.layers.0.mlp.up_proj.weight_scale":
                             np.ones((96, 3), np.float32)}),
     "weight_scale has shape [96, 3], expected [96, 4]"),
    (lambda qc, t: qc.update(quant_method="gptq"), None),
])
def test_bad_compressed_tensors_folders(tmp_path, change, message):
    src = model_folder(tmp_path / "m")
    run("quantize", src, tmp_path / "art", "-q", "--bits", "4", "--granularity", "group",
        "--group-size", "16")
    out = tmp_path / "out"
    run("export", tmp_path / "art", out, "--to", "compressed-tensors")
    cfg = json.loads((out / "config.json").read_text())
    t = load_file(out / "model.safetensors")
    change(cfg["quantization_config"], t)
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run("dequantize", out, tmp_path / "r.safetensors", expect=2)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    if message is not None:
        assert message in lines[0]
        r = run("report", out, "--against", src, expect=2)
        assert message in r.stderr
    assert not (tmp_path / "r.safetensors").exists()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_export_format_json_is_the_same_as_json(tmp_path):
    """One spelling for machine output across commands (issue 15): export too."""
    src = model_folder(tmp_path / "m")
    run("quantize", src, tmp_path / "art", "-q", "--bits", "4", "--granularity", "group",
        "--group-size", "16")
    docs = []
    for i, flag in enumerate((["--format", "json"], ["--json"])):
        out = tmp_path / f"out{i}"
        r = run("export", tmp_path / "art", out, "--to", "compressed-tensors", *flag, "-q")
        doc = json.loads(r.stdout)
        assert doc.pop("seconds") >= 0 and doc.pop("output") == str(out) and r.stderr == ""
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        targets = [t for g in cfg["config_groups"].values() for t in g["targets"]]
        assert doc["modules"] == len(targets) == len(
            [n for n in load_file(out / "model.safetensors") if n.endswith(".weight_scale")])
        assert sorted(doc["copied"]) == sorted(p.name for p in out.iterdir()
                                               if p.suffix != ".safetensors"
                                               and p.name != "config.json")
        docs.append(doc)
    assert docs[0] == docs[1]
    assert docs[0]["to"] == "compressed-tensors" and docs[0]["shards"] == 1
    # without the flag stdout stays empty (the summary is on stderr)
    r = run("export", tmp_path / "art", tmp_path / "out2", "--to", "compressed-tensors")
    assert r.stdout == "" and "exported" in r.stderr
