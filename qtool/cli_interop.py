"""The interop commands: `qtool export` and `qtool report --against` (docs/EXPORT.md).

Kept beside cli.py (same layer, same rules: the one place that prints and exits).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from qtool.console import FilePath, _err_console, _progress
from qtool.options import output_format_options

if TYPE_CHECKING:
    from qtool.report.model import ReportOptions

EXIT_OK = 0


@click.command()
@click.argument("art_dir", type=FilePath())
@click.argument("out_dir", type=FilePath())
@click.option("--to", "to", type=click.Choice(["compressed-tensors"]), required=True,
              help="The layout to write (docs/EXPORT.md).")
@click.option("--model-dir", type=FilePath(), default=None,
              help="The Hugging Face model folder (config.json, tokenizer, ...); default: the "
                   "one recorded when the artifact was quantized.")
@click.option("--force", is_flag=True, help="Replace an earlier export in OUT_DIR.")
@output_format_options
@click.option("--quiet", "-q", is_flag=True, help="Nothing on stderr except errors.")
def export(art_dir: Path, out_dir: Path, to: str, model_dir: Path | None, force: bool,
           fmt: str, as_json: bool, quiet: bool) -> int:
    """Write the artifact ART_DIR as a model folder OUT_DIR that transformers and vLLM load:
    config.json with a quantization_config, the weights, every other file of the model."""
    from qtool.pipeline.export import export_artifact

    t0 = time.perf_counter()
    res = export_artifact(art_dir, out_dir, to, model_dir, force)
    console = _err_console(quiet)
    for w in res.warnings:
        console.print(f"qtool: warning: {w}", markup=False, soft_wrap=True)
    if as_json or fmt == "json":  # one spelling for machine output across commands
        click.echo(json.dumps({"output": str(out_dir), "to": to, "modules": res.modules,
                               "shards": res.shards, "copied": res.copied,
                               "warnings": res.warnings,
                               "seconds": round(time.perf_counter() - t0, 3)}, indent=2))
    console.print(f"exported {res.modules} quantized modules ({res.shards} shard"
                  f"{'s' if res.shards != 1 else ''}, {len(res.copied)} other files) into "
                  f"{out_dir} in {time.perf_counter() - t0:.2f} s", markup=False, soft_wrap=True)
    return EXIT_OK



def report_against(path: Path, against: Path, given: list[str], original: Path | None,
             verify_: bool, show: bool, checks: ReportOptions) -> Any:
    """`report PATH --against ORIGINAL` (pipeline/against.py)."""
    from qtool.formats.manifest import MANIFEST
    from qtool.formats.native import Artifact
    from qtool.pipeline.against import AgainstRun
    from qtool.pipeline.foreign import is_ct_folder
    from qtool.report.against import against_report

    for flag, bad in ((given[0] if given else "", bool(given)),
                      ("--original", original is not None)):
        if bad:
            raise click.UsageError(f"{flag} does not go with --against")
    native = path.is_dir() and (path / MANIFEST).exists()
    if not native and not is_ct_folder(path):
        raise click.BadParameter(f"{path} is neither a qtool artifact (no {MANIFEST}) nor a "
                                 "compressed-tensors model folder", param_hint="PATH")
    if verify_:
        if not native:
            raise click.UsageError("--verify applies to a qtool artifact")
        Artifact.open(path).verify_files()
    run = AgainstRun(path, against)
    records = [r.record for r in _progress(iter(run), run.total, run.total_bytes, "measure",
                                           show)]
    return against_report(path, records, against, options=checks)
