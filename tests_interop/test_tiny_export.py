"""Upstream behaviour the export relies on or works around, shown with a hand-written writer
built from the layout functions (the export itself, through the CLI: test_export_cli.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tiny_models import make_tiny_llama
from transformers import AutoModelForCausalLM

from qtool.core.quant import dequantize, quantize
from qtool.core.schemes import QuantSpec
from qtool.formats import compressed_tensors_layout as L


def export(src: Path, dst: Path, spec_for, prefix: str | None = None,
           per_group_format: bool = True) -> dict[str, np.ndarray]:
    """Write ``src`` quantized into ``dst``; return qtool's dequantized weights by name."""
    shutil.copytree(src, dst)
    files = sorted(src.glob("*.safetensors"))
    groups: dict[L.WeightArgs, list[str]] = {}
    expected = {}
    for f in files:
        out = {}
        for name, w in load_file(f).items():
            spec = spec_for(name) if w.ndim == 2 and "embed" not in name else None
            if spec is None:
                out[name] = w
                continue
            qt = quantize(w, spec)
            expected[name] = dequantize(qt.data, qt.scale, qt.zero_point, qt.shape, spec,
                                        np.float32)
            args, ct = L.qtool_to_ct(qt.data, qt.scale, qt.zero_point, scheme=spec.scheme,
                                     bits=spec.bits, granularity=spec.granularity,
                                     shape=w.shape, group_size=spec.group_size)
            module = name.removesuffix(".weight")
            out.update({f"{module}.{k}": v for k, v in ct.items()})
            groups.setdefault(args, []).append(L.exact_target(module, prefix))
        save_file(out, dst / f.name, metadata={"format": "pt"})
    index = dst / "model.safetensors.index.json"
    if index.exists():  # every name of a shard now lives where its weight did
        idx = json.loads(index.read_text())
        idx["weight_map"] = {n: f.name for f in files for n in load_file(dst / f.name)}
        index.write_text(json.dumps(idx))
    qc = L.build_quantization_config([(t, a) for a, t in groups.items()])
    if not per_group_format:
        for g in qc["config_groups"].values():
            del g["format"]
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return expected


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "src")


CASES = {
    "8bit-channel": lambda n: QuantSpec("symmetric", 8, "channel"),
}


def test_without_per_group_format_8bit_does_not_load(llama, tmp_path):
    """transformers 5.24 / compressed-tensors 0.20.1 ignore the top-level `format` and infer
    pack-quantized for weight-only int schemes: int8 `weight` tensors then fail at the first
    forward. Hence build_quantization_config writes every group's `format`."""
    export(llama, tmp_path / "q", CASES["8bit-channel"], per_group_format=False)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32,
                                                       output_loading_info=True)
    assert "lm_head.weight" in info["unexpected_keys"]
    with pytest.raises(RuntimeError), torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_asymmetric_4bit_pack_quantized_does_not_load_upstream(llama, tmp_path):
    """The known upstream problem (llm-compressor #1618): transformers creates the zero point
    unpacked, [rows, groups], while the checkpoint holds it packed, [rows*bits/32, groups].
    The layout itself is checked against the library's decompression in
    test_ct_layout_vs_library.py."""
    export(llama, tmp_path / "q", lambda n: QuantSpec("asymmetric", 4, "group", group_size=16))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
