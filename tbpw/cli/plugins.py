"""`tbpw plugins`: every installed plugin, its version, its hooks and what it registers."""

from __future__ import annotations

import json
import os

import click

from tbpw.plugin.hookspecs import hookimpl


@hookimpl
def tbpw_register_commands(cli: click.Group) -> None:
    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="print the list as JSON (for scripts)")
    def plugins(as_json: bool) -> None:
        """List installed plugins (built-ins included) with their versions, hooks and registrations."""
        from tbpw.plugin.manager import BLOCK_ENV, get_manager

        manager = get_manager()
        rows = manager.describe()
        for row in rows:
            row["registers"] = {
                kind: [{"name": name, "description": getattr(manager.registries[kind].get(name), "description", "")}
                       for name in names]
                for kind, names in row["provides"].items()}
        blocked = sorted({b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()})
        if as_json:
            click.echo(json.dumps({"plugins": rows, "blocked": blocked}, indent=2))
            return
        for row in rows:
            click.echo(f"{row['name']} {row['version']}")
            click.echo(f"  hooks: {', '.join(row['hooks']) or 'none'}")
            for kind, items in row["registers"].items():
                for item in items:
                    click.echo(f"  {kind} {item['name']}: {item['description']}".rstrip(": "))
        if blocked:
            click.echo(f"blocked by {BLOCK_ENV}: {', '.join(blocked)}")
