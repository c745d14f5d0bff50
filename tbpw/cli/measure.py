"""`tbpw measure`: the per-tensor error table of a model (cached), with a readable summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tbpw.cli.support import console, default, existing_file, threads_option
from tbpw.measure.options import SamplingOptions
from tbpw.plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from rich.console import JustifyMethod


@hookimpl
def tbpw_register_commands(cli: click.Group) -> None:
    @cli.command()
    @click.argument("model", type=click.Path(path_type=Path))
    @click.option("--imatrix", "imatrix", type=click.Path(path_type=Path), default=None,
                  help="importance matrix (GGUF or legacy .dat) of the model")
    @click.option("--metric", default=None, help="error metric plugin (see `tbpw plugins`; default: the registry's default)")
    @click.option("--metric-option", "metric_options", multiple=True, metavar="KEY=VALUE",
                  help="an option of the metric, repeatable (e.g. cnif=false)")
    @click.option("--types", default=None, help="comma-separated candidate types (default: the fork's 20)")
    @click.option("--sample-scale", type=float, default=default(SamplingOptions, "scale"), show_default=True,
                  help="rows measured relative to the fork's sampling (0.25: a quarter)")
    @click.option("--fork-sampling", is_flag=True,
                  help="the fork's rows where it samples a slice (default: a fifth of them; exact slices stay exact)")
    @click.option("--all-rows", is_flag=True, help="measure every row of every tensor (exact, slow)")
    @threads_option("worker threads (default: all cores)")
    @click.option("--out", type=click.Path(path_type=Path), default=None, help="write the table as JSON here")
    @click.option("--csv", "csv_path", type=click.Path(path_type=Path), default=None, help="write the table as CSV here")
    @click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                  help="where measurements are cached (default: $TBPW_HOME/measure)")
    @click.option("--quiet", "-q", is_flag=True, help="no progress bar and no summary table")
    def measure(model, imatrix, metric, metric_options, types, sample_scale, fork_sampling, all_rows, threads, out,
                csv_path, cache_dir, quiet):
        """Measure bytes and error of every candidate type for every quantizable tensor of MODEL."""
        from tbpw.cli.quantize import measure_options, measured_table
        from tbpw.files.outputs import refuse_overwriting_inputs

        existing_file(model, "model file")
        refuse_overwriting_inputs({"--out": out, "--csv": csv_path}, {"model": model, "imatrix": imatrix})
        if out is not None and csv_path is not None and Path(out).resolve() == Path(csv_path).resolve():
            from tbpw.errors import TbpwError

            raise TbpwError(f"--out and --csv are both {out}: give each its own file")
        options = measure_options(metric, metric_options, types, threads, "measure", scale=sample_scale,
                                  all_rows=all_rows, **({"sampled_share": 1.0} if fork_sampling else {}))
        metric = options.metric.name
        table = measured_table(model, imatrix, options, cache_dir=cache_dir, progress=not quiet)
        if out is not None:
            table.write_json(out)
        if csv_path is not None:
            table.write_csv(csv_path)
        missing = table.meta.get("imatrix_missing") or []
        if not quiet:
            _print_summary(table)
        source = "cache" if table.meta.get("cached") else f"{table.meta.get('seconds', 0):.1f} s"
        n_cand = sum(len(t.candidates) for t in table.tensors)
        click.echo(f"{len(table.tensors)} tensors, {n_cand} candidates measured with {metric} ({source}); "
                   f"table {table.meta.get('key')}" + (f"; written to {out}" if out else ""))
        if missing:
            click.echo(f"note: the imatrix has no data for {len(missing)} tensor(s) ({', '.join(missing[:3])}"
                       f"{', ...' if len(missing) > 3 else ''}): measured without importance weights", err=True)


def _print_summary(table) -> None:
    """Per tensor: how many candidates, the best and worst of them by error, and the bpw range."""
    from rich.table import Table

    out = Table(title="measured error per tensor")
    out.add_column("tensor", no_wrap=True)
    columns: tuple[tuple[str, JustifyMethod], ...] = (("types", "right"), ("best", "left"), ("worst", "left"),
                                                     ("bpw", "right"))
    for col, justify in columns:
        out.add_column(col, justify=justify, no_wrap=True)

    def fmt(v: float) -> str:
        return "inf" if not math.isfinite(v) else f"{v:.4g}"

    for t in table.tensors:
        best = min(t.candidates, key=lambda c: (c.error, c.bytes))
        worst = max(t.candidates, key=lambda c: (c.error, -c.bytes))
        bpw = [8.0 * c.bytes / t.n_elements for c in t.candidates]
        out.add_row(t.name, str(len(t.candidates)), f"{best.type} {fmt(best.error)}", f"{worst.type} {fmt(worst.error)}",
                    f"{min(bpw):.2f}-{max(bpw):.2f}")
    console.print(out)
