"""Automatic mixed precision (``--target-bits B``, ``--target-sqnr DB``): choose each tensor's
bits and group size from measured candidates, as recipe rules.

For every tensor the plan would quantize and no recipe rule fixes, each candidate setting
(bits 2-8 x group sizes 16-256 or one scale per channel, with the command line's scheme and
range) is quantized in memory and its relative squared error ``error_sq / signal_sq``
measured; its cost is the tensor's exact stored size (``core.shapes.stored_bytes``: integers,
scales in the scale dtype, zero points). ``core.allocate`` then picks one candidate per tensor.
With ``--scale-bits 8`` (``Target.scale_bits``) every group candidate stores its scales as
8-bit codes times one float32 per row (``core.double_quant``), costed as stored; one scale per
channel stays a float (there is nothing to code), and a recipe rule's group setting gets codes
as it would without a target.
A tensor a recipe rule matches keeps that rule's setting (one candidate: its cost counts
against the budget; the allocator spends the rest).

Large tensors are measured on a fixed, seeded sample of whole rows (``SAMPLE_VALUES`` values
at most), so the plan is reproducible and the sweep costs about the same per tensor whatever
its size. The result is a list of rules, one exact-name rule per quantized tensor, that
``pipeline.plan`` applies like any recipe; ``recipe.dump_recipe`` writes them as TOML.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from qtool.core import allocate as alloc
from qtool.core.blocks import NegativeValuesError, NonFiniteError
from qtool.core.quant import quantize
from qtool.core.schemes import QuantSpec, SpecError
from qtool.core.shapes import rows_cols, stored_bytes
from qtool.formats._common import CheckpointError, TensorInfo
from qtool.formats.safetensors import SafetensorsFile
from qtool.formats.shards import Checkpoint, open_checkpoint
from qtool.pipeline.plan import Plan, QuantizeOptions, Rule, decide, make_plan
from qtool.pipeline.streams import _blas_single_threaded, _jobs

BITS = (2, 3, 4, 5, 6, 7, 8)
GROUP_SIZES = (16, 32, 64, 128, 256)
# Tensors larger than this are measured on a seeded sample of whole rows of about this many
# values. At 2^17 values the SQNR of a sample is within ~0.05 dB of the whole tensor's on
# weight-like data (the bench checks the plan's estimate against the artifact's figure), and
# 42 candidates on 36 tensors stay within the 4x-a-plain-quantize budget (make bench).
SAMPLE_VALUES = 1 << 17
SAMPLE_SEED = 0


@dataclass(frozen=True)
class Target:
    """What to aim for: a size (bits per weight of the quantized tensors), an SQNR every
    tensor reaches with the fewest bits, or both: the size, with the SQNR as a floor that every
    tensor reaches first (where any candidate can), the rest allocated for the least error."""

    bits: float | None = None
    sqnr_db: float | None = None
    scale_bits: int | None = None  # 8: group candidates with 8-bit scale codes

    def __post_init__(self) -> None:
        if self.bits is None and self.sqnr_db is None:
            raise SpecError("give --target-bits, --target-sqnr or both")
        if self.scale_bits not in (None, 8):
            raise SpecError(f"--scale-bits must be 8, got {self.scale_bits!r:.40}")
        if self.bits is not None and not (math.isfinite(self.bits) and self.bits > 0):
            raise SpecError(f"--target-bits must be a positive number, got {self.bits}")
        if self.sqnr_db is not None and not math.isfinite(self.sqnr_db):
            raise SpecError(f"--target-sqnr must be a finite number, got {self.sqnr_db}")


@dataclass(frozen=True)
class Choice:
    """The setting chosen for one tensor, with the figures it was chosen on."""

    name: str
    shape: tuple[int, ...]
    spec: QuantSpec
    n_weights: int
    stored_bytes: int
    sqnr_db: float  # measured on the sample (or the whole tensor)
    sampled_rows: int | None  # rows measured, when a sample
    fixed: str | None  # the recipe rule that fixed it, if any


@dataclass(frozen=True)
class MixedPlan:
    choices: tuple[Choice, ...]
    rules: tuple[Rule, ...]  # the choices as exact-name rules, then the user's skip rules
    target: Target
    short: tuple[str, ...]  # --target-sqnr: tensors no candidate brings to the target

    @property
    def bits_per_weight(self) -> float:
        n = sum(c.n_weights for c in self.choices)
        return 8.0 * sum(c.stored_bytes for c in self.choices) / n if n else 0.0

    @property
    def sqnr_db(self) -> float:
        """The estimated SQNR of all quantized tensors together (size-weighted error)."""
        n = sum(c.n_weights for c in self.choices)
        err = sum(c.n_weights * 10.0 ** (-c.sqnr_db / 10.0) for c in self.choices
                  if math.isfinite(c.sqnr_db))
        return alloc.sqnr_db(err / n) if n else math.inf

    @property
    def sampled(self) -> int:
        return sum(1 for c in self.choices if c.sampled_rows is not None and c.fixed is None)


def candidate_specs(base: QuantSpec, cols: int, scale_bits: int | None = None
                    ) -> list[QuantSpec]:
    """Bits 2-8 x (groups of 16-256 values, one scale per channel) with ``base``'s scheme,
    range and scale dtype. Group sizes not below the row length are left out: one group per
    row is the per-channel candidate. With ``scale_bits`` the group candidates store 8-bit
    scale codes times a float32 per row (instead of, not beside, float scales: measured better
    per bit at every group size, bench/accuracy.py)."""
    grans = [("group", g) for g in GROUP_SIZES if g < cols] + [("channel", base.group_size)]
    out = [base.with_(bits=b, granularity=gr, group_size=g) for b in BITS for gr, g in grans]
    return [_coded(s, scale_bits) for s in out]


def _coded(spec: QuantSpec, scale_bits: int | None) -> QuantSpec:
    """``spec`` with scale codes when it has group scales and codes were asked for."""
    if scale_bits is None or spec.granularity != "group":
        return spec
    return spec.with_(scale_bits=scale_bits, scale_dtype="float32")


def _fixed_spec(info: TensorInfo, spec: QuantSpec, rule: Rule, opts: QuantizeOptions,
                scale_bits: int | None) -> QuantSpec:
    """The setting a recipe rule fixes, with ``--scale-bits`` applied as without a target: a
    group setting gets codes unless the rule says ``scale_bits`` itself (the same checks, e.g.
    a rule's float16 scale_dtype is refused, by ``plan.decide``)."""
    if scale_bits is None or spec.granularity != "group" or \
            "scale_bits" in dict(rule.settings):
        return spec
    base = opts.spec.with_(granularity="group", group_size=spec.group_size,
                           scale_bits=scale_bits)
    coded = decide(info, replace(opts, spec=base))[0]
    assert coded is not None  # the rule quantizes it (spec is not None)
    return coded


def exact_rule(name: str, spec: QuantSpec, origin: str) -> Rule:
    settings: dict[str, object] = {"scheme": spec.scheme, "bits": spec.bits,
                                   "granularity": spec.granularity, "range": spec.range}
    if spec.granularity == "group":
        settings["group_size"] = spec.group_size
    if spec.range == "percentile":
        settings["percentile"] = float(spec.percentile)
    settings["scale_dtype"] = spec.scale_dtype  # as resolved for the tensor ("auto" is not)
    if spec.scale_bits is not None:
        settings["scale_bits"] = spec.scale_bits
    # \Z, not $: "$" also matches before a trailing newline, and names may hold one.
    return Rule(match="re:^" + re.escape(name) + "\\Z", settings=tuple(settings.items()),
                origin=origin)


def _first_rule(name: str, opts: QuantizeOptions) -> Rule | None:
    return next((r for r in opts.rules if r.matches(name)), None)


def _sample_rows(info: TensorInfo) -> np.ndarray | None:
    """Indices of the sampled rows of a large tensor (sorted), or None to measure it whole."""
    rows, cols = rows_cols(info.shape)
    if rows * cols <= SAMPLE_VALUES or rows <= 1:
        return None
    k = min(rows, max(1, SAMPLE_VALUES // max(cols, 1)))
    rng = np.random.default_rng(SAMPLE_SEED)
    return np.sort(rng.choice(rows, size=k, replace=False))


def _read(sf: SafetensorsFile, info: TensorInfo, idx: np.ndarray | None) -> np.ndarray:
    rows, cols = rows_cols(info.shape)
    if idx is None:
        return sf.read(info).reshape(rows, cols)
    return np.stack([np.array(sf.view(info, int(r) * cols, (int(r) + 1) * cols))
                     for r in idx])


def _measure(x: np.ndarray, specs: list[QuantSpec], mapper: Callable) -> list[float]:
    """Relative squared error of each spec on ``x`` (candidates run in parallel)."""
    def one(spec: QuantSpec) -> float:
        st = quantize(x, spec).stats
        return st.error_sq / st.signal_sq if st.signal_sq > 0 else 0.0
    return list(mapper(one, specs))


def plan_mixed(ckpt: Checkpoint, plan: Plan, opts: QuantizeOptions, target: Target,
               on_tensor: Callable[[str], None] | None = None) -> MixedPlan:
    """Measure the candidates of every free tensor of ``plan`` and allocate ``target``.

    Raises SpecError when the target cannot be met (a size below the smallest possible) or
    the scheme has no candidates (gnmt), CheckpointError for NaN/inf or negative values.
    """
    if opts.spec.scheme == "gnmt":
        raise SpecError("--target-bits / --target-sqnr choose bits and group sizes; scheme "
                        "gnmt is 8-bit per row only (use symmetric or asymmetric)")
    if target.scale_bits is not None and opts.scale_dtype not in ("auto", "float32"):
        raise SpecError("--scale-bits 8 stores one float32 scale per row: --scale-dtype must "
                        f"be float32 or auto, not {opts.scale_dtype}")
    items = [(info, spec) for info, spec, _ in plan.items if spec is not None]
    files = {p: SafetensorsFile(p) for p in {info.path for info, _ in items}}
    pool = ThreadPoolExecutor(max_workers=_jobs(opts.jobs))
    cands: list[list[alloc.Candidate]] = []
    meta: list[tuple[TensorInfo, Rule | None, int | None]] = []
    try:
        with _blas_single_threaded():
            for info, spec in items:
                rule = _first_rule(info.name, opts)
                specs = [_fixed_spec(info, spec, rule, opts, target.scale_bits)] \
                    if rule is not None else \
                    candidate_specs(spec, rows_cols(info.shape)[1], target.scale_bits)
                idx = _sample_rows(info)
                sf = files[info.path]
                try:
                    errs = _measure(_read(sf, info, idx), specs, pool.map)
                except NonFiniteError as e:
                    raise CheckpointError(f"{sf.path}: tensor {info.name!r} has {e} (use "
                                          "--skip to keep it in float)") from None
                except NegativeValuesError as e:
                    raise CheckpointError(f"{sf.path}: tensor {info.name!r} {e}; "
                                          "symmetric-unsigned needs values >= 0") from None
                cands.append([alloc.Candidate(s, 8 * stored_bytes(info.shape, s), e)
                              for s, e in zip(specs, errs, strict=True)])
                meta.append((info, rule, None if idx is None else len(idx)))
                if on_tensor is not None:
                    on_tensor(info.name)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for f in files.values():
            f.close()
    n_weights = [math.prod(info.shape) for info, _, _ in meta]
    short: tuple[str, ...] = ()
    if cands and target.bits is not None and target.sqnr_db is not None:
        # The floor: only the candidates that reach it (the most accurate one where none
        # does); the budget is then allocated among those.
        limit = 10.0 ** (-target.sqnr_db / 10.0)
        floor = []
        for (info, _, _), cs in zip(meta, cands, strict=True):
            ok = [c for c in cs if c.rel_error <= limit]
            if not ok:
                short += (info.name,)
                ok = [min(cs, key=lambda c: (c.rel_error, c.size_bits))]
            floor.append(ok)
        cands = floor
    if not cands:
        choice: tuple[int, ...] = ()
    elif target.bits is not None:
        try:
            choice = alloc.allocate(cands, n_weights, target.bits).choice
        except ValueError as e:
            floor = "" if target.sqnr_db is None else \
                f" with every tensor at --target-sqnr {target.sqnr_db:g} dB or more"
            raise SpecError(f"{e}{floor}") from None
    else:
        assert target.sqnr_db is not None
        ap = alloc.target_sqnr(cands, n_weights, target.sqnr_db)
        choice = ap.choice
        short = tuple(info.name for (info, _, _), s in zip(meta, ap.short, strict=True) if s)
    choices = []
    chosen: dict[str, QuantSpec] = {}
    for (info, rule, rows), cs, j, n in zip(meta, cands, choice, n_weights, strict=True):
        c = cs[j]
        spec = c.id
        assert isinstance(spec, QuantSpec)
        chosen[info.name] = spec
        choices.append(Choice(info.name, tuple(info.shape), spec, n, c.size_bits // 8,
                              alloc.sqnr_db(c.rel_error), rows,
                              None if rule is None else rule.label))
    mixed = replace(plan, items=[(i, chosen.get(i.name), r) for i, _, r in plan.items])
    return MixedPlan(tuple(choices), plan_rules(mixed, opts, "mixed-precision plan"), target,
                     short)


def plan_rules(plan: Plan, opts: QuantizeOptions, origin: str = "plan") -> tuple[Rule, ...]:
    """A recipe that reproduces ``plan``: an exact-name rule with every setting of each
    quantized tensor, then the user's skip rules that kept some tensor in float (verbatim,
    so that qtool.json gives the same reason). ``--skip`` / ``--only`` are not rules: the
    recipe is to be used with the same ones."""
    rules = [exact_rule(info.name, spec, origin) for info, spec, _ in plan.items
             if spec is not None]
    used = {id(r) for r in (_first_rule(i.name, opts) for i, s, _ in plan.items if s is None)
            if r is not None}
    return tuple(rules + [r for r in opts.rules if r.skip and id(r) in used])


def apply(ckpt: Checkpoint, opts: QuantizeOptions, mp: MixedPlan) -> tuple[QuantizeOptions, Plan]:
    """The options and plan that quantize with the mixed plan's settings."""
    new = replace(opts, rules=mp.rules)
    return new, make_plan(ckpt, new)


def dry_run_options(src: str | Path, opts: QuantizeOptions, target: Target
                    ) -> tuple[QuantizeOptions, MixedPlan]:
    """`report SRC --target-bits B`: the plan, and the options that quantize with it."""
    ckpt = open_checkpoint(src)
    mp = plan_mixed(ckpt, make_plan(ckpt, opts), opts, target)
    return apply(ckpt, opts, mp)[0], mp
