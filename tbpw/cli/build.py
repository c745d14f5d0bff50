"""`tbpw build`: fetch, verify and build the pinned llama.cpp tools into the cache."""

from __future__ import annotations

import click

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
        from tbpw.llamacpp.collector import install

        # the build's steps show like every tool's progress: a bar on a terminal, periodic lines in a log
        info = install(source, backend, jobs, force=force)
        click.echo(f"llama.cpp build {info.build_number} ({info.build_commit}, {info.backend}) ready in {info.bin_dir}")
