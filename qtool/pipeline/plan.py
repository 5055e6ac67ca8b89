"""Decide, before anything is written, what happens to each tensor: quantized with which
spec (options, recipe rules), or copied bit for bit and why."""

from __future__ import annotations

import fnmatch
import re
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from qtool.core.schemes import QuantSpec, SpecError
from qtool.formats._common import FLOAT_CODES, TensorInfo
from qtool.formats.manifest import TensorRecord
from qtool.formats.shards import Checkpoint
from qtool.formats.tensor_table import IndexedSequence


@dataclass(frozen=True)
class Rule:
    """One recipe rule: tensors whose name matches get these settings (or are skipped)."""

    match: str
    skip: bool = False
    settings: tuple[tuple[str, object], ...] = ()
    origin: str = ""  # where the rule was written, e.g. "recipe.toml rule 2", for messages

    @property
    def label(self) -> str:
        if self.origin:
            return f"{self.origin} (match {self.match!r})"
        return f"recipe rule {self.match!r}"

    def matches(self, name: str) -> bool:
        if self.match.startswith("re:"):
            return re.search(self.match[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.match)


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything `quantize` needs, built once at the edge (the CLI) and read-only after."""

    spec: QuantSpec = field(default_factory=QuantSpec)
    skip: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    allow_unused_rules: bool = False
    jobs: int = 0  # 0: one per core
    source_digest: bool = False
    nan_policy: str = "error"
    force: bool = False
    output_format: str = "qtool"  # a key of qtool.formats.registry.SINKS
    # "auto" or one of schemes.SCALE_DTYPES; resolved per tensor by decide() (a recipe rule's
    # scale_dtype wins), which overrides spec.scale_dtype.
    scale_dtype: str = "auto"


@dataclass(frozen=True)
class TensorResult:
    """One tensor done: what the manifest records, plus the input bytes it covered."""

    record: TensorRecord
    input_bytes: int


Item = tuple[TensorInfo, QuantSpec | None, str | None]


class PlanItems(IndexedSequence[Item]):
    """A plan's ``(info, spec, reason)`` per tensor, held compactly: the checkpoint's own
    TensorInfo sequence, and per tensor a 4-byte index into the few distinct ``(spec,
    reason)`` decisions (a tuple per tensor was 72 bytes: 14 MB for 200,000 tensors). The
    tuples are made as they are read; the sequence compares equal to a list of the same."""

    __slots__ = ("_infos", "_codes", "_decisions", "_known")

    def __init__(self, infos: Sequence[TensorInfo]) -> None:
        self._infos = infos
        self._codes = array("I")
        self._decisions: list[tuple[QuantSpec | None, str | None]] = []
        self._known: dict[tuple[QuantSpec | None, str | None], int] = {}

    def _add(self, spec: QuantSpec | None, reason: str | None) -> None:
        """The decision of the next tensor of ``infos`` (in order)."""
        key = (spec, reason)
        code = self._known.get(key)
        if code is None:
            code = self._known[key] = len(self._decisions)
            self._decisions.append(key)
        self._codes.append(code)

    def __len__(self) -> int:
        return len(self._codes)

    def _at(self, i: int) -> Item:
        spec, reason = self._decisions[self._codes[i]]
        return self._infos[i], spec, reason

    def __iter__(self) -> Iterator[Item]:
        decisions = self._decisions
        for info, code in zip(self._infos, self._codes, strict=True):
            spec, reason = decisions[code]
            yield info, spec, reason

    def __repr__(self) -> str:
        return f"PlanItems({list(self)!r})"


@dataclass
class Plan:
    """What will happen to each tensor, decided before anything is written."""

    checkpoint: Checkpoint
    items: Sequence[Item]  # PlanItems from make_plan; a list where a plan is rewritten
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info, _, _ in self.items)


# Scales are stored in the spec's scale_dtype (docs/FORMAT.md): weights beyond qmax times its
# largest value (about 4e40 for float32 or bfloat16, 8e6 for float16 at 8 bits) would need a
# larger one, which becomes inf and would restore as inf or NaN.
def scale_overflow(spec: QuantSpec) -> str:
    return f"has values too large for a {spec.scale_dtype} scale"


# What "auto" means: the source's own precision for F16 and BF16 (their scales need no more),
# float32 for F32 and F64.
AUTO_SCALE_DTYPES = {"F16": "float16", "BF16": "bfloat16"}


def resolve_scale_dtype(choice: str, dtype_code: str) -> str:
    """The scale dtype of a tensor of safetensors dtype ``dtype_code`` for ``choice``."""
    if choice == "auto":
        return AUTO_SCALE_DTYPES.get(dtype_code, "float32")
    return choice


def _glob_any(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def decide(info: TensorInfo, opts: QuantizeOptions) -> tuple[QuantSpec | None, str | None]:
    """(spec, None) to quantize the tensor, or (None, reason) to copy it bit for bit."""
    if info.dtype not in FLOAT_CODES:
        return None, f"{info.dtype} is not a float dtype"
    if len(info.shape) == 0:
        return None, "scalar"
    if len(info.shape) == 1:
        return None, "1-D tensor (bias or norm)"
    if info.nbytes == 0:
        return None, "empty tensor"
    if _glob_any(info.name, opts.skip):
        return None, "matched --skip"
    if opts.only and not _glob_any(info.name, opts.only):
        return None, "not matched by --only"
    spec = opts.spec
    scale_dtype = opts.scale_dtype
    for rule in opts.rules:
        if rule.matches(info.name):
            if rule.skip:
                return None, f"recipe rule {rule.match!r}: skip"
            try:
                settings = dict(rule.settings)
                scale_dtype = str(settings.pop("scale_dtype", scale_dtype))
                spec = spec.with_(**settings)
                if spec.scheme == "gnmt" and settings.get("granularity", "channel") != "channel":
                    raise SpecError(f"scheme gnmt is always per row, not {settings['granularity']}")
            except (SpecError, TypeError) as e:
                raise SpecError(f"{rule.label} on tensor {info.name!r}: {e}") from None
            break
    if spec.scale_bits is not None and scale_dtype == "auto":
        scale_dtype = "float32"  # the one float per row of 8-bit scale codes is float32
    try:
        return spec.with_(scale_dtype=resolve_scale_dtype(scale_dtype, info.dtype)), None
    except SpecError as e:
        raise SpecError(f"tensor {info.name!r}: {e}") from None


def make_plan(ckpt: Checkpoint, opts: QuantizeOptions) -> Plan:
    infos = ckpt.tensor_infos()
    items = PlanItems(infos)
    used: set[int] = set()
    for info in infos:
        spec, reason = decide(info, opts)
        for i, rule in enumerate(opts.rules):
            if rule.matches(info.name):
                used.add(i)
                break
        items._add(spec, reason)
    plan = Plan(ckpt, items)
    if items and all(spec is None for _, spec, _ in items):
        # Nothing to do is legal (the artifact is a copy) but rarely what was meant.
        where = ckpt.index_path or ckpt.shards[0]
        if all(info.dtype not in FLOAT_CODES for info, _, _ in items):
            plan.warnings.append(
                f"{where}: every tensor has an integer dtype (already quantized?); no tensor "
                "is quantized, the output holds them unchanged")
        else:
            plan.warnings.append(
                f"{where}: no tensor is quantized (each is kept in float: 1-D, scalar, empty, "
                "not float, or left out by --skip/--only/a recipe)")
    for i, rule in enumerate(opts.rules):
        if i not in used:
            msg = f"{rule.label} matches no tensor"
            if not opts.allow_unused_rules:
                raise SpecError(msg + " (use --allow-unused-rules to allow it)")
            plan.warnings.append(msg)
    return plan

