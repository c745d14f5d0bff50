"""`tbpw build`: fetch, verify and build the pinned llama.cpp tools into the cache."""

from __future__ import annotations

import click

from tbpw.cli.support import console
from tbpw.plugin.hookspecs import hookimpl


@hookimpl
def tbpw_register_commands(cli: click.Group) -> None:
    @cli.command()
    @click.option("--source", default=None, help="a source named in vendor/llama-cpp.toml (upstream, fork) or a llama.cpp checkout path")
    @click.option("--backend", default="auto", type=click.Choice(["auto", "cpu", "cuda", "metal", "vulkan"]), show_default=True)
    @click.option("--jobs", "-j", type=int, default=None, help="parallel compile jobs (default: all cores)")
    @click.option("--force", is_flag=True, help="rebuild even when the cache has this build")
    def build(source, backend, jobs, force):
        """Fetch, verify and build the pinned llama.cpp tools into the cache."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from tbpw.llamacpp.collector import install

        if not console.is_terminal:
            # A log (CI, a pipe) gets a line per tenth of the build instead of a live bar, and no stray blank line.
            shown = set()

            def report(done: int, total: int) -> None:
                tenth = 10 * done // max(total, 1)
                if tenth not in shown:
                    shown.add(tenth)
                    click.echo(f"building llama.cpp: step {done}/{total}", err=True)

            info = install(source, backend, jobs, force=force, progress=report)
            click.echo(f"llama.cpp build {info.build_number} ({info.build_commit}, {info.backend}) ready in {info.bin_dir}")
            return
        with Progress(TextColumn("building llama.cpp"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task("build", total=None)
            info = install(source, backend, jobs, force=force,
                                 progress=lambda done, total: bar.update(task, completed=done, total=total))
        click.echo(f"llama.cpp build {info.build_number} ({info.build_commit}, {info.backend}) ready in {info.bin_dir}")
