"""A prototype of issue 12's interop cases, built from the layout functions directly:
quantize a tiny model's Linear weights with qtool, write them in the compressed-tensors
layout, load with transformers. (``qtool export`` will replace the hand-written writer.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tiny_models import make_tiny_bert, make_tiny_llama, sample_inputs
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

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


def load_and_check(path: Path, expected: dict[str, np.ndarray], auto=AutoModelForCausalLM,
                   strip: str = "") -> float:
    model, info = auto.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                         "error_msgs")), info
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        out = model(**sample_inputs(tok))  # the first forward decompresses the weights
    params = dict(model.named_parameters())
    for name, want in expected.items():
        got = params[name.removeprefix(strip)].detach().numpy()
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=name)
    return out


CASES = {
    "8bit-channel": lambda n: QuantSpec("symmetric", 8, "channel"),
    "8bit-gnmt": lambda n: QuantSpec("gnmt"),
    "8bit-group": lambda n: QuantSpec("symmetric", 8, "group", group_size=32),
    "8bit-asymmetric": lambda n: QuantSpec("asymmetric", 8, "channel"),
    "4bit-symmetric-group": lambda n: QuantSpec("symmetric", 4, "group", group_size=16),
    "recipe-8-and-4": lambda n: QuantSpec("symmetric", 4 if "mlp" in n else 8, "channel"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_llama_loads_with_qtools_weights(llama, tmp_path, case):
    expected = export(llama, tmp_path / case, CASES[case])
    assert len(expected) == 15  # 7 Linear per layer x 2 + lm_head
    load_and_check(tmp_path / case, expected)


def test_sharded_llama(tmp_path):
    src = make_tiny_llama(tmp_path / "src", max_shard_size="100KB")
    assert len(list(src.glob("*.safetensors"))) > 1
    expected = export(src, tmp_path / "q", CASES["recipe-8-and-4"])
    load_and_check(tmp_path / "q", expected)


def test_forward_is_close_to_the_dequantized_model(llama, tmp_path):
    expected = export(llama, tmp_path / "q", CASES["8bit-channel"])
    deq = tmp_path / "deq"
    shutil.copytree(llama, deq)
    t = load_file(llama / "model.safetensors")
    save_file({**t, **expected}, deq / "model.safetensors", metadata={"format": "pt"})
    got = load_and_check(tmp_path / "q", expected).logits
    ref = AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32)
    with torch.no_grad():
        want = ref(**sample_inputs(AutoTokenizer.from_pretrained(deq))).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bert_with_automodel(tmp_path):
    src = make_tiny_bert(tmp_path / "src")
    expected = export(src, tmp_path / "q", CASES["8bit-asymmetric"])
    assert len(expected) == 13  # 6 Linear per layer x 2 + the pooler
    load_and_check(tmp_path / "q", expected, auto=AutoModel)


def test_optional_prefix_targets_load_into_the_bare_model(llama, tmp_path):
    """AutoModel on a ...ForCausalLM checkpoint drops the `model.` prefix (and lm_head)."""
    expected = export(llama, tmp_path / "q", CASES["8bit-channel"], prefix="model")
    model = AutoModel.from_pretrained(tmp_path / "q", dtype=torch.float32)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    params = dict(model.named_parameters())
    for name, want in expected.items():
        if name != "lm_head.weight":
            np.testing.assert_array_equal(params[name.removeprefix("model.")].numpy(), want)


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
