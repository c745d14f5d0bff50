"""`tbpw sweep`: models x recipes as one task graph on one executor, and one combined table."""

from __future__ import annotations

import click

from tbpw.plugin.hookspecs import hookimpl


@hookimpl
def tbpw_register_commands(cli: click.Group) -> None:
    @cli.command()
    @click.argument("sweep_file", metavar="SWEEP.yaml", type=click.Path(dir_okay=False))
    @click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                  help="override a field of every run's recipe (repeatable)")
    @click.option("--executor", "executor", metavar="NAME", help="run the sweep with this executor plugin instead "
                                                                 "of the sweep file's")
    @click.option("-o", "--output-dir", type=click.Path(file_okay=False), default=None,
                  help="where the runs and the table go (default: the sweep file's output_dir, else runs/<name>)")
    def sweep(sweep_file, overrides, executor, output_dir):
        """Run every model x recipe of a sweep file as one graph; print the combined table."""
        from pathlib import Path

        from tbpw.run.sweep import run

        table = run(sweep_file, list(overrides), executor, Path(output_dir).resolve() if output_dir else None,
                    log=lambda line: click.echo(line, err=True))
        click.echo(table.read_text(encoding="utf-8"))
