"""The command-line side of mixed precision and written recipes (`quantize --target-bits`,
`--target-sqnr`, `--write-recipe`; `report SRC --target-bits`). Kept beside cli.py (same
layer, same rules: the one place that prints and exits)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from qtool.console import _err_console, _show_progress


def start_quantize(src: Path, out_dir: Path, opts: Any, target: Any,
                   write_recipe: Path | None, quiet: bool) -> Any:
    """The quantize run, with the mixed-precision plan (``target``: a pipeline Target or
    None) measured and applied when asked for (its summary line on stderr)."""
    from qtool.pipeline.run import quantize_checkpoint

    if write_recipe is not None and write_recipe.is_dir():
        raise click.BadParameter(f"{write_recipe} is a directory", param_hint="'--write-recipe'")
    console = _err_console(quiet)
    if target is not None and _show_progress(quiet):  # a progress note, on a terminal only
        console.print("qtool: measuring the candidate settings of every tensor (bits 2-8 x "
                      "group sizes) to choose the mixed-precision plan...", markup=False,
                      soft_wrap=True)
    results = quantize_checkpoint(src, out_dir, opts, target)
    if results.mixed is not None:
        from qtool.report.plan import mixed_line

        console.print(f"qtool: {mixed_line(results.mixed)}", markup=False, soft_wrap=True)
    return results


def finish_quantize(results: Any, src: Path, write_recipe: Path | None,
                    summary: dict | None) -> None:
    """After the artifact is published: the recipe file, the plan's figures in the summary."""
    if write_recipe is not None:
        from qtool.pipeline.mixed import plan_rules
        from qtool.pipeline.recipe import write_recipe as write_recipe_file
        from qtool.report.plan import recipe_header

        write_recipe_file(write_recipe, plan_rules(results.plan, results.opts, "plan"),
                          recipe_header(src.name, results.mixed))
    if summary is not None and results.mixed is not None:
        from qtool.report.plan import mixed_summary

        summary["mixed_precision"] = mixed_summary(results.mixed)


def dry_run_options(path: Path, opts: Any, specs: list, target: Any, quiet: bool,
                    fmt: str) -> Any:
    """`report SRC --target-bits B`: the plan per tensor on stdout (table format) and its
    summary on stderr; returns the options whose dry run measures it."""
    if target is None:
        return opts
    if len(specs) > 1:
        raise click.UsageError("--target-bits / --target-sqnr plan for one --scheme and one "
                               "--bits")
    from qtool.pipeline.mixed import dry_run_options as plan
    from qtool.report.plan import mixed_line, plan_table

    opts, mp = plan(path, opts, target)
    _err_console(quiet).print(f"qtool: {mixed_line(mp)}", markup=False, soft_wrap=True)
    if fmt == "table":  # json/csv/markdown give every tensor's settings anyway
        click.echo(plan_table(mp))
    return opts
