"""The command line: thin Click commands over qtool.pipeline and qtool.report.

This is the one place that prints, maps errors to exit codes (0 ok, 1 a report threshold
failed, 2 bad usage or input) and exits. numpy and rich are imported inside the commands so
that ``qtool --version`` stays fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from qtool import __version__
from qtool.console import (
    FilePath,
    _echo_pieces,
    _err_console,
    _fail,
    _one_line,
    _progress,
    _show_progress,
    _warn,
)
from qtool.group import EXIT_BAD_INPUT, EXIT_OK, QtoolGroup
from qtool.options import (
    DRY_RUN_PARAMS,
    SCHEME_CHOICES,
    _dry_run_specs,
    _load_rules,
    _make_spec,
    _make_target,
    _workload,
    estimate_options,
    ineffective_option_warnings,
    output_format_options,
    report_spec_options,
    selection_options,
    spec_options,
    target_options,
)


def _note(quiet: bool, line: str) -> None:
    """One plain line on stderr (unless --quiet): no Rich for a line that needs no drawing."""
    if not quiet:
        click.echo(line, err=True)


@click.group(cls=QtoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="qtool")
def cli() -> None:
    """qtool: post-training quantization of safetensors checkpoints.

    \b
      qtool quantize in.safetensors out/ --scheme gnmt
      qtool dequantize out/ restored.safetensors
      qtool report out/
    """


@cli.command()
@click.argument("src", type=FilePath())
@click.argument("out_dir", type=FilePath())
@click.option("--scheme", "-s", type=click.Choice(SCHEME_CHOICES), default="symmetric",
              show_default=True, help="Quantization scheme (see README for the formulas).")
@spec_options
@selection_options("")
@target_options(dry_run=False)
@click.option("--write-recipe", type=FilePath(), default=None, metavar="FILE.toml",
              help="Also write the settings used for every tensor as a recipe; quantize "
                   "--recipe FILE.toml (with the same --skip/--only) writes the same artifact.")
@click.option("--jobs", "-j", type=click.IntRange(0), default=0,
              help="Worker threads (default 0: one per core). Output is identical for any N.")
@click.option("--source-digest", is_flag=True,
              help="Also record the BLAKE3 digest of the whole source file(s) (reads them "
                   "once more).")
@click.option("--force", is_flag=True, help="Replace an earlier qtool artifact in OUT_DIR.")
@output_format_options
@click.option("--quiet", "-q", is_flag=True, help="Nothing on stderr except errors.")
def quantize(src: Path, out_dir: Path, scheme: str, granularity: str, bits: int, group_size: int,
             range_: str, percentile: float, scale_dtype: str, scale_bits: int | None,
             skip: tuple[str, ...], only: tuple[str, ...], recipe: Path | None,
             allow_unused_rules: bool, nan_policy: str, target_bits: float | None,
             target_sqnr: float | None, write_recipe: Path | None, jobs: int, source_digest: bool,
             force: bool, fmt: str, as_json: bool, quiet: bool) -> int:
    """Quantize SRC (a .safetensors file, a sharded *.safetensors.index.json, or a directory
    holding either) into the artifact directory OUT_DIR."""
    from qtool.cli_mixed import finish_quantize, start_quantize
    from qtool.pipeline.plan import QuantizeOptions

    explicit = click.get_current_context().get_parameter_source("granularity")
    if scheme == "gnmt" and granularity != "channel" and explicit is ParameterSource.COMMANDLINE:
        raise click.BadParameter(f"scheme gnmt is always per row, not {granularity}",
                                 param_hint="'--granularity'")
    as_json = as_json or fmt == "json"
    target = _make_target(target_bits, target_sqnr, scale_bits)  # codes: for its candidates
    spec = _make_spec(scheme, granularity, bits, group_size, range_, percentile,
                      None if target else scale_bits)
    rules = _load_rules(recipe)
    opts = QuantizeOptions(spec=spec, skip=skip, only=only, rules=rules,
                           allow_unused_rules=allow_unused_rules, jobs=jobs,
                           source_digest=source_digest, nan_policy=nan_policy, force=force,
                           scale_dtype=scale_dtype)
    t0 = time.perf_counter()
    results = start_quantize(src, out_dir, opts, target, write_recipe, quiet)
    plan = results.plan
    console = _err_console(quiet)
    ctx = click.get_current_context()
    for w in [*ineffective_option_warnings(ctx, granularity, range_, rules), *plan.warnings]:
        # One line, verbatim: a glob like "*[0-9]*" is not Rich markup, and a long path must
        # not be wrapped (stderr may be a log that is grepped).
        console.print(f"qtool: warning: {w}", markup=False, soft_wrap=True)
    records = [r.record for r in _progress(results, len(plan.items), plan.total_bytes,
                                           "quantize", _show_progress(quiet))]
    seconds = time.perf_counter() - t0
    finish_quantize(results, src, write_recipe, None)
    for r in records:
        if r.passthrough is not None and r.passthrough.startswith("NaN/inf"):
            console.print(f"qtool: warning: tensor {r.name!r} has NaN/inf values; kept in "
                          "float (--nan-policy skip)", markup=False, soft_wrap=True)
    if quiet and not as_json:
        return EXIT_OK  # nothing to show: no summary to build
    from qtool.report.summary import quantize_summary
    from qtool.report.tables import render_summary

    summary = quantize_summary(records, Path(out_dir), seconds, list(results.ckpt.shards))
    finish_quantize(results, src, None, summary)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    console.print(render_summary(summary))
    return EXIT_OK


@cli.command()
@click.argument("art_dir", type=FilePath())
@click.argument("out", type=FilePath(str))  # a str: "dir/" (trailing slash) means a directory
@click.option("--dtype", type=click.Choice(["original", "float32", "float16", "bfloat16"]),
              default="original", show_default=True,
              help="dtype of the restored float tensors (integer tensors keep theirs).")
@click.option("--jobs", "-j", type=click.IntRange(0), default=0,
              help="Worker threads (default 0: one per core).")
@click.option("--verify", "verify_", is_flag=True,
              help="Check every file's size and digest against the manifest first.")
@click.option("--force", is_flag=True, help="Replace an existing OUT file.")
@output_format_options
@click.option("--quiet", "-q", is_flag=True, help="Nothing on stderr except errors.")
def dequantize(art_dir: Path, out: Any, dtype: str, jobs: int, verify_: bool, force: bool,
               fmt: str, as_json: bool, quiet: bool) -> int:
    """Restore a float checkpoint from the artifact ART_DIR (or a compressed-tensors model
    folder) into OUT: a .safetensors file, or (like cp) an existing directory or one given as
    DIR/, which receives the file under its original name; for a sharded input, the
    directory that receives the shards."""
    from qtool.pipeline.dequantize import dequantize_artifact
    from qtool.pipeline.foreign import dequantize_ct, is_ct_folder

    t0 = time.perf_counter()
    if is_ct_folder(art_dir) and not (art_dir / "qtool.json").exists():
        if verify_:
            raise click.UsageError("--verify applies to a qtool artifact; "
                                   f"{art_dir} is a compressed-tensors folder")
        restored = dequantize_ct(art_dir, out, dtype, force)
        n = sum(1 for _ in restored)
        out, total = restored.out, restored.total_bytes
    else:
        results = dequantize_artifact(art_dir, out, dtype, jobs, verify=verify_, force=force)
        m, out = results.manifest, results.out
        total = sum(t.original_bytes for t in m.tensors)
        n = sum(1 for _ in _progress(results, len(m.tensors), total, "dequantize",
                                     _show_progress(quiet)))
    seconds = time.perf_counter() - t0
    if as_json or fmt == "json":
        click.echo(json.dumps({"output": str(out), "tensors": n, "dtype": dtype,
                               "bytes": total, "seconds": round(seconds, 3)}, indent=2))
    _note(quiet, f"restored {n} tensors into {out} in {seconds:.2f} s")
    return EXIT_OK


@cli.command()
@click.argument("art_dir", type=FilePath())
@output_format_options
@click.option("--quiet", "-q", is_flag=True, help="Print only the problems, if any.")
def verify(art_dir: Path, fmt: str, as_json: bool, quiet: bool) -> int:
    """Check the artifact ART_DIR: qtool.json against its own digest, every file's size and
    digest (BLAKE3; SHA-256 in format_version 1) against qtool.json, every
    tensor's dtype and shape, each quantized tensor's scale and zero point, and that the
    integers, scales and zero points are inside their scheme's range. Exit 0 when all holds,
    2 otherwise, with one line per problem on stderr."""
    from qtool.formats.native import Artifact

    art = Artifact.load(art_dir)  # an unreadable manifest is one error like any bad input
    # a file that is not a regular file is named by both checks: said once
    problems = list(dict.fromkeys(art.file_problems() + art.tensor_problems()))
    m = art.manifest
    n_q = sum(1 for t in m.tensors if t.quantized)
    if as_json or fmt == "json":
        click.echo(json.dumps({"path": str(art_dir), "ok": not problems,
                               "files": len(m.files), "tensors": len(m.tensors),
                               "quantized": n_q, "problems": problems}, indent=2))
    for p in problems:
        _fail(p)
    if problems:
        _fail(f"{art_dir}: {len(problems)} problem{'s' if len(problems) != 1 else ''}; "
              "the artifact does not verify")
        return EXIT_BAD_INPUT
    _note(quiet, f"{art_dir}: ok: {len(m.files)} files match their size and {m.digest}; "
          f"{len(m.tensors)} tensors ({n_q} quantized) have the recorded dtypes, shapes and "
          "ranges")
    return EXIT_OK


REPORT_FORMATS = ("table", "json", "csv", "markdown", "html")  # qtool.report.model.FORMATS
REPORT_SORTS = ("name", "sqnr", "error", "size")  # qtool.report.SORT_KEYS


@cli.command()
@click.argument("path", type=FilePath(), default=Path("."), required=False)
@click.option("--scheme", "-s", "schemes", type=click.Choice(SCHEME_CHOICES), multiple=True,
              help="Dry run of a plain checkpoint: a scheme to try, one column group each "
                   "(repeatable; default symmetric).")
@report_spec_options
@selection_options("Dry run: ")
@target_options(dry_run=True)
@click.option("--original", type=FilePath(), default=None,
              help="Artifact: measure the error again against this original checkpoint "
                   "(its size and digests must match the manifest's).")
@click.option("--against", type=FilePath(), default=None,
              help="Measure PATH (a qtool artifact or a compressed-tensors model folder) "
                   "against this original float checkpoint, matched by tensor names.")
@click.option("--format", "fmt", type=click.Choice(REPORT_FORMATS), default="table",
              show_default=True,
              help="table (Rich, plain when not a terminal), json (docs/REPORT.md), csv, "
                   "markdown or html (one self-contained page with charts).")
@click.option("--chart", type=click.Choice(["sqnr", "bits"]), is_flag=False, flag_value="sqnr",
              default=None, help="Table: draw bars per tensor (SQNR, or bits per weight with "
                                 "--chart bits), or a layer × module heatmap.")
@click.option("--all", "show_all", is_flag=True,
              help="Table: list every kept tensor instead of one summed line.")
@click.option("--sort", type=click.Choice(REPORT_SORTS), default=None,
              help="Tensor order: name; sqnr (worst first); error (largest max abs error "
                   "first); size (largest first). Default: checkpoint order.")
@click.option("--top", type=click.IntRange(1), default=None, metavar="N",
              help="Show only the first N tensors; totals and thresholds still cover all.")
@click.option("--fail-under-sqnr", type=float, default=None, metavar="DB",
              help="Exit 1 if any quantized tensor's SQNR is below DB dB.")
@click.option("--fail-under-total-sqnr", type=float, default=None, metavar="DB",
              help="Exit 1 if the SQNR of all quantized tensors together (their errors "
                   "summed) is below DB dB.")
@click.option("--max-error", type=click.FloatRange(min=0), default=None, metavar="X",
              help="Exit 1 if any quantized tensor's max absolute error is above X.")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Leave tensors whose name matches out of every threshold (still shown; "
                   "repeatable), e.g. a tiny token_type_embeddings.")
@click.option("--energy-model", type=FilePath(), default=None,
              metavar="FILE.json", help="Energy figures in pJ (see docs/ENERGY.md).")
@estimate_options
@click.option("--jobs", "-j", type=click.IntRange(0), default=0,
              help="Worker threads for a dry run or --original (default 0: one per core).")
@click.option("--verify", "verify_", is_flag=True,
              help="Artifact: check every file's size and digest against the manifest first.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@click.pass_context
def report(ctx: click.Context, path: Path, schemes: tuple[str, ...], granularity: str,
           bits: tuple[int, ...], group_size: int, range_: str, percentile: float,
           scale_dtype: str, scale_bits: int | None, skip: tuple[str, ...],
           only: tuple[str, ...], recipe: Path | None,
           allow_unused_rules: bool, nan_policy: str, target_bits: float | None,
           target_sqnr: float | None, original: Path | None,
           against: Path | None, fmt: str, chart: str | None, show_all: bool,
           sort: str | None, top: int | None, fail_under_sqnr: float | None,
           fail_under_total_sqnr: float | None, max_error: float | None,
           exclude: tuple[str, ...], energy_model: Path | None, tokens: int,
           lookup: tuple[str, ...], int_activations: bool, bandwidth: float | None, jobs: int,
           verify_: bool, quiet: bool) -> int:
    """Per-tensor error, compression, memory and energy estimates of PATH (default: the
    current directory): a qtool artifact, or a plain checkpoint for a dry run of each
    --scheme (nothing is written). Exit 1 when --fail-under-sqnr, --fail-under-total-sqnr or
    --max-error is missed (--exclude leaves tensors out of them)."""
    import math

    from click.core import ParameterSource

    from qtool.formats._common import CheckpointError
    from qtool.formats.manifest import MANIFEST
    from qtool.formats.native import Artifact
    from qtool.report.energy import EnergyModel
    from qtool.report.model import (
        ReportError,
        ReportOptions,
        artifact_report,
        disk_bytes,
        dry_run_report,
        load_energy_model,
    )

    for flag, value in (("--fail-under-sqnr", fail_under_sqnr), ("--max-error", max_error),
                        ("--fail-under-total-sqnr", fail_under_total_sqnr)):
        if value is not None and not math.isfinite(value):
            raise click.BadParameter(f"must be a finite number, not {value}", param_hint=flag)
    # Every bad input is found before the (possibly long) measurement starts.
    model = load_energy_model(energy_model) if energy_model is not None else None
    given = [flag for p, flag in DRY_RUN_PARAMS.items()
             if ctx.get_parameter_source(p) in (ParameterSource.COMMANDLINE,
                                                ParameterSource.ENVIRONMENT)]
    show = _show_progress(quiet)
    if chart is not None and fmt != "table":
        raise click.UsageError(f"--chart draws in the terminal; it does not apply to --format "
                               f"{fmt}")
    checks = ReportOptions(model or EnergyModel(), _workload(tokens, lookup, int_activations,
                           bandwidth), fail_under_sqnr, max_error, fail_under_total_sqnr,
                           tuple(exclude))
    if exclude and fail_under_sqnr is None and max_error is None and \
            fail_under_total_sqnr is None:
        _warn("--exclude has no effect without --fail-under-sqnr, --fail-under-total-sqnr "
              "or --max-error", quiet)
    if path.is_file() and (path.parent / MANIFEST).is_file():
        # qtool.json itself, or one of an artifact's files: the artifact is the directory.
        raise click.BadParameter(f"{path} is part of a qtool artifact; report the directory "
                                 f"{path.parent}", param_hint="PATH")
    if against is None and path.is_dir() and not (path / MANIFEST).exists():
        from qtool.pipeline.foreign import is_ct_folder

        if is_ct_folder(path):  # its integers are not a float checkpoint to dry-run
            raise click.UsageError(f"{path} is a compressed-tensors model folder; give "
                                   "--against ORIGINAL to measure it")
    if against is not None:
        from qtool.cli_interop import report_against

        rep = report_against(path, against, given, original, verify_, show, checks)
    elif path.is_dir() and (path / MANIFEST).exists():
        if given:
            raise click.UsageError(f"{given[0]} applies to a dry run of a plain checkpoint; "
                                   f"{path} is a qtool artifact")
        if verify_:
            Artifact.open(path).verify_files()
        if original is None:
            art = Artifact.open(path)
            records = list(art.manifest.tensors)
            metrics_from = "manifest"
        else:
            from qtool.pipeline.measure import measure_artifact

            run = measure_artifact(path, original, jobs)
            art = run.art
            records = [r.record for r in _progress(iter(run), run.total, run.total_bytes,
                                                   "measure", show)]
            metrics_from = "original"
        m = art.manifest
        rep = artifact_report(path, records, metrics_from=metrics_from, original=original,
                              disk=disk_bytes(m.source, m.files), options=checks)
    else:
        if original is not None or verify_:
            flag = "--original" if original is not None else "--verify"
            raise click.UsageError(f"{flag} applies to an artifact; {path} is not one "
                                   f"(no {MANIFEST})")
        from qtool.cli_mixed import dry_run_options
        from qtool.pipeline.measure import dry_run
        from qtool.pipeline.plan import QuantizeOptions

        target = _make_target(target_bits, target_sqnr, scale_bits)
        specs = _dry_run_specs(schemes or ("symmetric",), bits, granularity, group_size,
                               range_, percentile, None if target else scale_bits)
        rules = _load_rules(recipe)
        for w in ineffective_option_warnings(ctx, granularity, range_, rules):
            _warn(w, quiet)
        try:
            opts = QuantizeOptions(spec=specs[0], skip=skip, only=only,
                                   rules=rules,
                                   allow_unused_rules=allow_unused_rules,
                                   nan_policy=nan_policy, jobs=jobs, scale_dtype=scale_dtype)
            opts = dry_run_options(path, opts, specs, target, quiet, fmt)
            drun = dry_run(path, specs, opts)
        except CheckpointError as e:
            if path.is_dir():  # most likely a mistyped artifact directory
                raise ReportError(f"{path}: neither a qtool artifact (no {MANIFEST}) nor a "
                                  f"checkpoint: {e}") from None
            raise
        results = [r.records for r in _progress(iter(drun), drun.total, drun.total_bytes,
                                                "dry run", show)]
        rep = dry_run_report(path, specs, results, options=checks)
    if fmt == "table":
        from qtool.console import _out_console

        console = _out_console()  # plain text when stdout is no TTY or NO_COLOR is set
        if chart is not None:
            from qtool.report.chart import render_chart

            console.print(render_chart(rep, chart, console.width))
        else:
            from qtool.report.tables import render_report_parts
            for part in render_report_parts(rep, sort, top, console.width, show_all=show_all):
                console.print(part)  # part by part: a large table comes in chunks
    elif fmt == "html":
        from qtool.report.html import iter_html
        from qtool.report.weights import histograms

        hists, note = histograms(rep)
        _echo_pieces(iter_html(rep, hists, note, sort, top))  # a row at a time
    else:
        from qtool.report.text import iter_csv, iter_json, iter_markdown
        render = {"json": iter_json, "csv": iter_csv, "markdown": iter_markdown}[fmt]
        _echo_pieces(render(rep, sort, top))
    for o in rep.offenders:
        click.echo(f"qtool: fail: {_one_line(o.message())}", err=True)
    return rep.exit_code


from qtool.cli_interop import export  # noqa: E402  (the command needs `cli` defined first)

cli.add_command(export)


def main() -> None:
    cli.main(prog_name="qtool")
