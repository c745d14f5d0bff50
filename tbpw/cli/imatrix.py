"""`tbpw imatrix`: make an importance matrix (stock llama-imatrix or tbpw's collector), and show its statistics.

    tbpw imatrix MODEL.gguf -f TEXT.txt -o OUT.gguf [--collector stock|tbpw] [--chunks N] [--ctx N]
    tbpw imatrix stats I.gguf [--json]

The first form is shorthand for `tbpw imatrix make ...`.
"""

from __future__ import annotations

import json

import click

from tbpw.cli.support import threads_option
from tbpw.plugin.hookspecs import hookimpl


class _DefaultToMake(click.Group):
    """A group whose first argument, when it names no subcommand, starts `make`'s arguments."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["make", *args]
        return super().parse_args(ctx, args)


@hookimpl
def tbpw_register_commands(cli: click.Group) -> None:
    @cli.group(cls=_DefaultToMake)
    def imatrix():
        """Make an importance matrix (`tbpw imatrix MODEL -f TEXT -o OUT`) or show its statistics (`stats`)."""

    @imatrix.command()
    @click.argument("model", type=click.Path(dir_okay=False))
    @click.option("-f", "--file", "text", required=True, type=click.Path(dir_okay=False), help="calibration text")
    @click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="the GGUF imatrix to write")
    @click.option("--collector", type=click.Choice(["stock", "tbpw"]), default="stock", show_default=True,
                  help="stock llama-imatrix (E[a^2]) or tbpw's collector (E[a^2] and E[a])")
    @click.option("--chunks", type=click.IntRange(min=1), default=None, help="use only the first N chunks")
    @click.option("--ctx", type=click.IntRange(min=1), default=512, show_default=True, help="tokens per chunk")
    @threads_option("CPU threads (default: the tool's)")
    @click.option("--log", "log_path", type=click.Path(dir_okay=False), default=None, help="log file (default: OUT.log)")
    def make(model, text, out, collector, chunks, ctx, threads, log_path):
        """Run a collector over calibration text and write a GGUF imatrix."""
        from tbpw.imatrix.reader import Imatrix
        from tbpw.llamacpp.imatrix import make_imatrix

        run = make_imatrix(model, text, out, collector=collector, chunks=chunks, ctx=ctx, threads=threads,
                           log_path=log_path)
        imx = Imatrix.load(run.path)
        means = ", with E[a]" if imx.has_means else ""
        click.echo(f"{run.path}: {len(imx.entries)} tensors from {imx.chunk_count} chunks of {imx.chunk_size} tokens"
                   f"{means} ({collector} collector, {run.seconds:.1f} s; log: {run.log_path})")

    @imatrix.command()
    @click.argument("path", type=click.Path(dir_okay=False))
    @click.option("--json", "as_json", is_flag=True, help="print the statistics as JSON")
    def stats(path, as_json):
        """Per-tensor statistics of an imatrix: E[a^2] mean, std, entropy, cosine with the previous layer."""
        from tbpw.imatrix.reader import Imatrix
        from tbpw.imatrix.stats import tensor_statistics

        rows = tensor_statistics(Imatrix.load(path))
        if as_json:
            click.echo(json.dumps([r.to_json() for r in rows], indent=1))
            return
        _print_table(rows)


def _print_table(rows) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    with_means = any(r.ea_mean is not None for r in rows)
    table = Table(box=None, pad_edge=False)
    for col in ("tensor", "N", "sum E[a²]", "min", "max", "mean", "std", "active", "entropy", "H/Hmax", "ZD", "cos prev"):
        table.add_column(escape(col), justify="left" if col == "tensor" else "right")
    if with_means:
        table.add_column(escape("mean E[a]"), justify="right")
        table.add_column(escape("std E[a]"), justify="right")
    for r in rows:
        cells = [r.name, str(r.elements), f"{r.sum:.2f}", f"{r.min:.4f}", f"{r.max:.4f}", f"{r.mean:.4f}",
                 f"{r.std:.4f}", f"{100 * r.active:.1f}%", f"{r.entropy:.4f}", f"{100 * r.entropy_norm:.2f}%",
                 f"{100 * r.zd:.2f}%", "-" if r.cossim is None else f"{r.cossim:.4f}"]
        if with_means:
            cells += ["-" if r.ea_mean is None else f"{r.ea_mean:.4f}", "-" if r.ea_std is None else f"{r.ea_std:.4f}"]
        table.add_row(*cells)
    Console(width=200).print(table)
