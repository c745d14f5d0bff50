"""The `tbpw` command line. Subcommands are thin: they parse arguments and call the library."""

from __future__ import annotations

import functools
import json
import sys

import click
from rich.console import Console

from . import __version__
from .errors import TbpwError

console = Console(stderr=True)


def user_errors(fn):
    """Turn a TbpwError into one line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TbpwError as exc:
            click.echo(f"error: {exc}", err=True)
            if exc.details:
                click.echo(exc.details, err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tbpw")
def main() -> None:
    """tbpw: quantize GGUF models to an exact bits-per-weight target with the least error."""


@main.command()
@click.option("--source", default=None, help="a source named in vendor/llama-cpp.toml (upstream, fork) or a llama.cpp checkout path")
@click.option("--backend", default="auto", type=click.Choice(["auto", "cpu", "cuda", "metal", "vulkan"]), show_default=True)
@click.option("--jobs", "-j", type=int, default=None, help="parallel compile jobs (default: all cores)")
@click.option("--force", is_flag=True, help="rebuild even when the cache has this build")
@user_errors
def build(source, backend, jobs, force):
    """Fetch, verify and build the pinned llama.cpp tools into the cache."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .llamacpp import build as builder

    with Progress(TextColumn("building llama.cpp"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("build", total=None)
        info = builder.build(source, backend, jobs, force=force,
                             progress=lambda done, total: bar.update(task, completed=done, total=total))
    click.echo(f"llama.cpp build {info.build_number} ({info.build_commit}, {info.backend}) ready in {info.bin_dir}")


if __name__ == "__main__":
    main()
