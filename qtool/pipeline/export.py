"""`qtool export`: a native artifact as a Hugging Face model folder another tool loads.

The artifact is read through its source (``SOURCES["qtool"]``), each tensor handed to the
target's sink (``SINKS["compressed-tensors"]``), then config.json gets the sink's
``quantization_config`` and every other file of the model folder is copied. Everything is
written into a staging directory renamed into place at the end (pipeline/staging.py).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from qtool.core.shapes import rows_cols
from qtool.formats import hf_folder
from qtool.formats._common import DTYPES, CheckpointError, TensorInfo
from qtool.formats.compressed_tensors_sink import CompressedTensorsSink
from qtool.formats.registry import SINKS, SOURCES, OutTensor, PlannedTensor, Source
from qtool.pipeline.staging import OutputError, _Staging

TARGETS = ("compressed-tensors",)
# Module-name prefixes transformers drops when a checkpoint is loaded into the bare model
# class (its base_model_prefix): the export's targets match with and without them.
KNOWN_PREFIXES = ("model", "transformer", "bert", "roberta", "deberta", "distilbert",
                  "encoder", "decoder", "gpt_neox")
# The last module-name part of an input (word) embedding: LLaMA-likes, BERT-likes, GPT-2,
# T5, GPT-NeoX, Meta's original LLaMA.
WORD_EMBEDDINGS = ("embed_tokens", "word_embeddings", "wte", "shared", "embed_in",
                   "tok_embeddings")
# ... and of an output layer (LLaMA-likes, BERT's MLM head, GPT-NeoX, Meta's LLaMA).
OUTPUT_LAYERS = ("lm_head", "decoder", "embed_out", "output")
TIED = ("the output layer shares it (tie_word_embeddings), and a shared quantized weight "
        "does not load")


@dataclass
class ExportResult:
    out: Path
    modules: int = 0
    shards: int = 0
    copied: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def export_artifact(art_dir: str | Path, out_dir: str | Path, to: str = "compressed-tensors",
                    model_dir: str | Path | None = None, force: bool = False) -> ExportResult:
    """Write the artifact ``art_dir`` as a model folder in ``out_dir``. Bad input (no model
    folder, no config.json, an existing OUT_DIR without ``force``) raises before anything is
    written."""
    if to not in TARGETS:
        raise CheckpointError(f"unknown export target {to!r}; choose {', '.join(TARGETS)}")
    src = SOURCES["qtool"](Path(art_dir))
    warnings: list[str] = []
    recorded = src.manifest.source.get("model_folder")
    if model_dir is None:
        if not isinstance(recorded, dict) or not isinstance(recorded.get("path"), str):
            raise CheckpointError(
                f"{art_dir}: the manifest records no model folder (the checkpoint was not "
                "quantized from a folder with config.json); pass --model-dir DIR, the Hugging "
                "Face model folder holding its config.json")
        model = Path(recorded["path"])
        if not model.is_dir():
            raise CheckpointError(f"{model}: the model folder recorded in {art_dir} is gone; "
                                  "pass --model-dir DIR")
        warnings += _changed_files(model, recorded, src.manifest.digest)
    else:
        model = Path(model_dir)
        if not model.is_dir():
            raise CheckpointError(f"{model}: --model-dir is not a directory")
    config = hf_folder.read_config(model)
    if "quantization_config" in config:
        raise CheckpointError(f"{model / hf_folder.CONFIG}: already has a quantization_config; "
                              "export needs the float model's config")
    out = Path(out_dir)
    _check_out(out, [src.root, model], force)
    result = ExportResult(out, warnings=warnings)
    _run(src, model, config, out, result, force)
    return result


def _changed_files(model: Path, recorded: dict, alg: str) -> list[str]:
    out = []
    for f in recorded.get("files") or []:
        name = str(f.get("name"))
        p = model / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            out.append(f"{p}: recorded name is outside the model folder; not checked")
        elif not p.is_file():
            out.append(f"{p}: recorded at quantize time, now missing")
        elif hf_folder.file_digest(p, alg) != f.get(alg):
            out.append(f"{p}: changed since quantize time")
    return out


def _check_out(out: Path, inputs: list[Path], force: bool) -> None:
    resolved = out.resolve()
    for p in inputs:
        rp = p.resolve()
        if rp == resolved or resolved in rp.parents or rp in resolved.parents:
            raise OutputError(f"{out}: output would overlap the input {p}")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{out}: exists and is not a directory")
        if any(out.iterdir()):
            if not force:
                raise OutputError(f"{out}: output directory is not empty (use --force to "
                                  "replace an earlier export)")
            if _ct_folder_problem(out) is not None:
                raise OutputError(f"{out}: not a compressed-tensors model folder; --force "
                                  "replaces only those")


def _ct_folder_problem(out: Path) -> str | None:
    """Why ``out`` is not a compressed-tensors folder that --force may replace."""
    try:
        qc = json.loads(hf_folder.config_text(out / hf_folder.CONFIG)).get("quantization_config")
    except (CheckpointError, ValueError, AttributeError, RecursionError):
        qc = None
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        return "not a compressed-tensors model folder"
    return None


def _prefix(src: Source, config: dict) -> str | None:
    firsts = {t.name.split(".", 1)[0] for t in src.manifest.tensors if "." in t.name}
    for p in (config.get("model_type"), *KNOWN_PREFIXES):
        if isinstance(p, str) and p in firsts:
            return p
    return None


def tied_embeddings(names: list[str], quantized: list[str], config: dict) -> dict[str, str]:
    """The quantized input-embedding weights the model's output layer shares, each with the
    reason it stays float. transformers ties them when ``tie_word_embeddings`` is true and
    the class has an output layer (a bare ``...Model`` class has none). When config.json
    does not say, an output layer stored in the checkpoint (``names``) means untied; without
    one the embedding is kept float, which always loads correctly."""
    tie = config.get("tie_word_embeddings")
    if tie is None:
        tie = not any(n.removesuffix(".weight").rpartition(".")[2] in OUTPUT_LAYERS
                      for n in names if n.endswith(".weight"))
    if tie is not True:
        return {}
    arch = config.get("architectures")
    if isinstance(arch, list) and arch and all(
            isinstance(a, str) and a.endswith("Model") and not a.endswith("HeadModel")
            for a in arch):
        return {}
    return {n: TIED for n in quantized
            if n.endswith(".weight") and n.removesuffix(".weight").rpartition(".")[2]
            in WORD_EMBEDDINGS}


def _run(src: Source, model: Path, config: dict, out: Path, result: ExportResult,
         force: bool = False) -> None:
    m = src.manifest
    stage = _Staging(out, replace=force, check=_ct_folder_problem)
    sink = SINKS["compressed-tensors"](stage.tmp)
    assert isinstance(sink, CompressedTensorsSink)
    sink.prefix = _prefix(src, config)
    sink.keep_float = tied_embeddings([t.name for t in m.tensors],
                                      [t.name for t in m.tensors if t.spec is not None], config)
    try:
        single = len(m.shards) == 1
        for shard in m.shards:
            records = [t for t in m.tensors if t.file == shard]
            reader = src.open_shard(shard)
            try:
                planned = []
                for r in records:
                    stored = reader.read(r).info
                    shape = tuple(r.shape)
                    nbytes = math.prod(shape) * DTYPES[r.dtype].itemsize
                    info = TensorInfo(r.name, r.dtype, shape, stored.offset, nbytes, stored.path)
                    planned.append(PlannedTensor(info, r.spec))
                name = "model.safetensors" if single else shard
                sink.open(Path(name), reader.metadata, planned)
                for r, p in zip(records, planned, strict=True):
                    t = reader.read(r)
                    n = rows_cols(r.shape)[0] if r.spec is not None else p.info.numel
                    ot = OutTensor(p.info, r.spec, iter([(t.rows(0, n), None)]),
                                   t.scale, t.zero_point)
                    sink.write(ot)
            finally:
                reader.close()
        sink.finish(list(m.tensors), m.source, None)
        result.shards = len(m.shards)
        result.modules = sum(len(v) for v in sink.groups.values())
        config["quantization_config"] = sink.quantization_config()
        (stage.tmp / hf_folder.CONFIG).write_text(json.dumps(config, indent=2) + "\n",
                                                  encoding="utf-8")
        for f in hf_folder.other_files(model):
            rel = f.relative_to(model)
            if rel.as_posix() == hf_folder.CONFIG:
                continue
            (stage.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, stage.tmp / rel)
            result.copied.append(rel.as_posix())
        result.warnings += sink.warnings
        stage.commit_dir()
    except BaseException:
        sink.abort()
        stage.discard()
        raise

