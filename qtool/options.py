"""Click options shared by several commands, and turning them into qtool's frozen config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from qtool.console import FilePath

SCHEME_CHOICES = ("symmetric", "symmetric-unsigned", "asymmetric", "gnmt")
# qtool.core.schemes.MAX_GROUP_SIZE, spelled out: importing the core here would load numpy on
# every start-up (tests/test_cli.py checks that the two agree).
MAX_GROUP_SIZE = 1 << 24
# `report`'s options that only make sense for a dry run over a plain checkpoint.
DRY_RUN_PARAMS = {"schemes": "--scheme", "granularity": "--granularity", "bits": "--bits",
                  "group_size": "--group-size", "range_": "--range",
                  "percentile": "--percentile", "scale_dtype": "--scale-dtype",
                  "scale_bits": "--scale-bits", "skip": "--skip", "only": "--only",
                  "recipe": "--recipe", "allow_unused_rules": "--allow-unused-rules",
                  "nan_policy": "--nan-policy", "target_bits": "--target-bits",
                  "target_sqnr": "--target-sqnr"}


def spec_options(f: Any) -> Any:
    """The options that make a QuantSpec, shared by `quantize` and `report`'s dry run."""
    return _spec_options(f, multiple_bits=False)


def report_spec_options(f: Any) -> Any:
    """`report`'s dry run: the same, with --bits repeatable (one column group per width)."""
    return _spec_options(f, multiple_bits=True)


def _spec_options(f: Any, multiple_bits: bool) -> Any:
    bits_help = ("Bit width (2-8); below 8, values are bit-packed. gnmt is 8-bit only."
                 + (" Repeatable: each width is a column group." if multiple_bits else ""))
    opts = [
        click.option("--granularity", "-g", type=click.Choice(["tensor", "channel", "group"]),
                     default="channel", show_default=True,
                     help="One scale per tensor, per row (output channel) or per group of "
                          "--group-size values along a row. gnmt is always per row."),
        click.option("--bits", "-b", type=click.IntRange(2, 8), default=(8,) if multiple_bits
                     else 8, show_default=True, multiple=multiple_bits, help=bits_help),
        click.option("--group-size", type=click.IntRange(1, MAX_GROUP_SIZE), default=128,
                     show_default=True,
                     help="Values per group with --granularity group."),
        click.option("--range", "range_",
                     type=click.Choice(["minmax", "percentile", "mse", "search"]),
                     default="minmax", show_default=True,
                     help="How to pick the clipping range: min/max; a percentile of |w|; "
                          "mse, the clip of least squared error among 100 (slow: about 16x "
                          "minmax); search, a least-squares fit of each scale and zero point "
                          "over a few grids (more accurate than mse at 2-4 bits, faster; not "
                          "with gnmt)."),
        click.option("--percentile", type=float, default=99.99, show_default=True,
                     help="With --range percentile: clip at this percentile of |w| "
                          "(asymmetric: at the P and 100-P percentiles of w)."),
        click.option("--scale-dtype", type=click.Choice(["auto", "float32", "float16",
                                                         "bfloat16"]),
                     default="auto", show_default=True,
                     help="dtype the scales are stored in: auto is the tensor's own for "
                          "F16/BF16, float32 for F32/F64. q is computed with the stored scale."),
    ]
    opts.append(click.option(
        "--scale-bits", type=click.Choice(["8"]), default=None,
        callback=lambda ctx, param, v: None if v is None else int(v),
        help=("Dry run: " if multiple_bits else "") +
             "8: store group scales as 8-bit codes times one float32 per row (double "
             "quantization; 4-bit g32 costs 4.4 bits per weight instead of 4.6 with float16 "
             "scales, and measured no worse). Needs -g group; not gnmt. With --target-bits / "
             "--target-sqnr: every group candidate has codes (any -g)."))
    for o in reversed(opts):
        f = o(f)
    return f


def selection_options(prefix: str) -> Any:
    """Which tensors are quantized, and how: shared by `quantize` and `report`'s dry run."""

    def h(text: str) -> str:
        text = prefix + text
        return text[0].upper() + text[1:]

    def deco(f: Any) -> Any:
        opts = [
            click.option("--skip", multiple=True, metavar="GLOB",
                         help=h("keep tensors whose name matches in float (repeatable).")),
            click.option("--only", multiple=True, metavar="GLOB",
                         help=h("quantize only tensors whose name matches (repeatable).")),
            click.option("--recipe", type=FilePath(), default=None,
                         help=h("TOML file of per-tensor rules (docs/RECIPES.md).")),
            click.option("--allow-unused-rules", is_flag=True,
                         help=h("a recipe rule that matches nothing is a warning, not an "
                                "error.")),
            click.option("--nan-policy", type=click.Choice(["error", "skip"]), default="error",
                         show_default=True,
                         help=h("a tensor with NaN/inf fails, or is kept in float (costs "
                                "one extra read).")),
        ]
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


def _load_rules(recipe: Path | None) -> tuple:
    if recipe is None:
        return ()
    from qtool.pipeline.recipe import load_recipe

    return load_recipe(recipe)


def _make_spec(scheme: str, granularity: str, bits: int, group_size: int, range_: str,
               percentile: float, scale_bits: int | None = None) -> Any:
    from qtool.core.schemes import QuantSpec

    return QuantSpec(scheme=scheme, bits=bits, granularity=granularity, group_size=group_size,
                     range=range_, percentile=percentile, scale_bits=scale_bits)


def _dry_run_specs(schemes: Sequence[str], bits: Sequence[int], granularity: str,
                   group_size: int, range_: str, percentile: float,
                   scale_bits: int | None = None) -> list[Any]:
    """One spec per (scheme, bit width), schemes first. gnmt is 8-bit only: with several
    widths it takes the 8-bit one alone (and is an error when 8 is not among them)."""
    out = []
    for s in dict.fromkeys(schemes):
        widths = list(dict.fromkeys(bits))
        if s == "gnmt" and len(widths) > 1:
            widths = [8] if 8 in widths else widths[:1]
        out += [_make_spec(s, granularity, b, group_size, range_, percentile, scale_bits)
                for b in widths]
    return out


def estimate_options(f: Any) -> Any:
    """`report`'s workload of the energy, latency and area estimates (docs/ENERGY.md)."""
    opts = [
        click.option("--tokens", type=click.IntRange(1), default=1, show_default=True,
                     metavar="N", help="Estimates: tokens in the pass (each reads one row of "
                                       "a lookup table and does one MAC per weight)."),
        click.option("--lookup", multiple=True, metavar="GLOB",
                     help="Estimates: tensors looked up by row, not multiplied (repeatable; "
                          "replaces the default *embed*, wte, wpe)."),
        click.option("--int-activations", is_flag=True,
                     help="Estimates: integer activations (int8 MACs); default float "
                          "(weight-only quantization)."),
        click.option("--bandwidth", type=click.FloatRange(min=0, min_open=True), default=None,
                     metavar="GB/S", help="Estimates: DRAM bandwidth for the memory-bound "
                                          "latency (default 89.6: dual-channel DDR5-5600)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _workload(tokens: int, lookup: Sequence[str], int_activations: bool,
              bandwidth: float | None) -> Any:
    import math

    from qtool.report.energy import DEFAULT_BANDWIDTH_GBS, DEFAULT_LOOKUP, Workload

    if bandwidth is not None and not math.isfinite(bandwidth):
        raise click.BadParameter(f"must be a finite number, not {bandwidth}",
                                 param_hint="--bandwidth")
    return Workload(tokens=tokens, int_activations=int_activations,
                    lookup=tuple(lookup) if lookup else DEFAULT_LOOKUP,
                    bandwidth_gbs=DEFAULT_BANDWIDTH_GBS if bandwidth is None else bandwidth)


def ineffective_option_warnings(ctx: click.Context, granularity: str, range_: str,
                                rules: tuple) -> list[str]:
    """Warnings for spec options given on the command line that change nothing: a
    --group-size without --granularity group, a --percentile without --range percentile
    (unless a recipe rule turns that granularity or range on for some tensors)."""
    from click.core import ParameterSource

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                                  ParameterSource.ENVIRONMENT)

    def in_rules(key: str, value: str) -> bool:
        return any(dict(r.settings).get(key) == value for r in rules)

    out = []
    if given("group_size") and granularity != "group" and not in_rules("granularity", "group"):
        out.append(f"--group-size has no effect without --granularity group (granularity is "
                   f"{granularity})")
    if given("percentile") and range_ != "percentile" and not in_rules("range", "percentile"):
        out.append(f"--percentile has no effect without --range percentile (range is {range_})")
    return out


def output_format_options(f: Any) -> Any:
    """--format table|json (one spelling across commands, as on `report`) and --json, the
    older alias of --format json."""
    f = click.option("--json", "as_json", is_flag=True, help="Same as --format json.")(f)
    return click.option("--format", "fmt", type=click.Choice(["table", "json"]),
                        default="table", show_default=True,
                        help="table (a summary on stderr) or json (on stdout).")(f)


def target_options(dry_run: bool) -> Any:
    """--target-bits / --target-sqnr: mixed precision for `quantize`, its plan for `report`."""
    if dry_run:
        bits_help = ("Dry run: the per-tensor plan of `quantize --target-bits B` (one --scheme), "
                     "then its measured report; nothing is written.")
        sqnr_help = "Dry run: the plan of `quantize --target-sqnr DB`."
    else:
        bits_help = ("Mixed precision: choose each tensor's bits (2-8) and group size (16-256 "
                     "or per channel) so that the quantized tensors take at most B bits per "
                     "weight (sidecars included) with the least total error. Recipe rules fix "
                     "a tensor's setting; the rest of the budget is allocated. With "
                     "--scale-bits 8 the group candidates have 8-bit scale codes (about 2 dB "
                     "more at the same size in make bench).")
        sqnr_help = ("Mixed precision: the fewest bits such that every tensor reaches DB dB "
                     "(large tensors measured on a seeded sample of rows). With --target-bits: "
                     "a floor every tensor reaches first, the rest of the budget allocated.")

    def deco(f: Any) -> Any:
        f = click.option("--target-sqnr", type=float, default=None, metavar="DB",
                         help=sqnr_help)(f)
        return click.option("--target-bits", type=float, default=None, metavar="B",
                            help=bits_help)(f)

    return deco


def _make_target(bits: float | None, sqnr: float | None, scale_bits: int | None = None) -> Any:
    """--target-bits / --target-sqnr as a pipeline Target, or None for neither. With them,
    --scale-bits goes to the Target (the group candidates get codes), not to the spec."""
    if bits is None and sqnr is None:
        return None
    from qtool.pipeline.mixed import Target

    return Target(bits, sqnr, scale_bits)
