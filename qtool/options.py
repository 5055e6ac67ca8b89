"""Click options shared by several commands, and turning them into qtool's frozen config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from qtool.console import FilePath

SCHEME_CHOICES = ("symmetric", "symmetric-unsigned", "asymmetric", "gnmt")


SCHEME_CHOICES = ("symmetric", "symmetric-unsigned", "asymmetric", "gnmt")


def spec_options(f: Any) -> Any:
    """The options that make a QuantSpec, shared by `quantize` and `report`'s dry run."""
    opts = [
        click.option("--granularity", "-g", type=click.Choice(["tensor", "channel", "group"]),
                     default="channel", show_default=True,
                     help="One scale per tensor, per row (output channel) or per group of "
                          "--group-size values along a row. gnmt is always per row."),
        click.option("--bits", "-b", type=click.IntRange(2, 8), default=8, show_default=True,
                     help="Bit width (2-8); below 8, values are bit-packed. gnmt is 8-bit only."),
        click.option("--group-size", type=click.IntRange(1), default=128, show_default=True,
                     help="Values per group with --granularity group."),
        click.option("--range", "range_", type=click.Choice(["minmax", "percentile", "mse"]),
                     default="minmax", show_default=True,
                     help="How to pick the clipping range: min/max, a percentile of |w|, or "
                          "the clip that minimises the squared error."),
        click.option("--percentile", type=float, default=99.99, show_default=True,
                     help="With --range percentile: clip at this percentile of |w| "
                          "(asymmetric: at the P and 100-P percentiles of w)."),
    ]
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
               percentile: float) -> Any:
    from qtool.core.schemes import QuantSpec

    return QuantSpec(scheme=scheme, bits=bits, granularity=granularity, group_size=group_size,
                     range=range_, percentile=percentile)
