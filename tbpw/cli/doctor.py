"""`tbpw doctor`: the active llama.cpp build and what its tools can do."""

from __future__ import annotations

import json

import click

from tbpw.plugin.hookspecs import hookimpl


@hookimpl
def tbpw_register_commands(cli: click.Group) -> None:
    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="print the report as JSON (for scripts)")
    def doctor(as_json: bool) -> None:
        """Show the active llama.cpp build, its tools, and the features detected from them."""
        from tbpw.llamacpp.doctor import report

        data = report()
        if as_json:
            click.echo(json.dumps(data, indent=2))
            return
        b, d = data["build"], data["detected"]
        lines = [
            f"tbpw {data['tbpw']['version']} (Python {data['tbpw']['python']}), cache {data['tbpw']['home']}",
            "",
            f"build      {b['source']}: llama.cpp build {d['build_number']}, commit {d['commit']} ({d['version']})",
            f"backend    {b['backend']}; devices: {', '.join(d['devices']) or 'CPU only'}",
            f"compiler   {d['compiler']} for {d['target']}",
            f"folder     {b['root']}",
            f"build log  {b['log']}",
            f"ggml-base  {b['libggml_base']}",
        ]
        lines += [f"{'tools' if i == 0 else '':<10} {path}" for i, path in enumerate(b["tools"].values())]
        lines += ["", "features"]
        for tool, flags in data["features"].items():
            present = [f for f, ok in flags.items() if ok]
            absent = [f for f, ok in flags.items() if not ok]
            lines.append(f"  {tool:<17} {' '.join(present)}" + (f"   (absent: {' '.join(absent)})" if absent else ""))
        lines.append(f"  {'quantize types':<17} {len(d['quantize_types'])}: {' '.join(d['quantize_types'])}")
        flush = data["output_flush"]
        lines.append(f"  {'log flush':<17} {'on (' + flush['path'] + ')' if flush['active'] else 'off: ' + flush['reason']}")
        for warning in data["warnings"]:
            lines.append(f"warning: {warning}")
        click.echo("\n".join(lines))
