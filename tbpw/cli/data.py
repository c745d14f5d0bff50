"""`tbpw data`: list dataset plugins, fetch the offline demo assets, materialize a dataset."""

from __future__ import annotations

import json

import click

from tbpw.plugin.hookspecs import hookimpl
from tbpw.run.overrides import key_values


def _parse_options(pairs: tuple[str, ...], as_json: str | None) -> dict:
    from tbpw.errors import TbpwError

    options = {}
    if as_json:
        try:
            options = json.loads(as_json)
        except json.JSONDecodeError as exc:
            raise TbpwError(f"--options-json is not JSON ({exc.msg}): give an object such as '{{\"split\": \"evaluation\"}}'") from None
        if not isinstance(options, dict):
            raise TbpwError("--options-json must be a JSON object")
    return {**options, **key_values(pairs, flag="-o", example="split=evaluation")}


@hookimpl
def tbpw_register_commands(cli: click.Group) -> None:
    @cli.group()
    def data() -> None:
        """Calibration and evaluation data: dataset plugins and the offline demo assets."""

    @data.command("list")
    @click.option("--json", "as_json", is_flag=True, help="print JSON (for scripts)")
    def list_(as_json: bool) -> None:
        """List dataset plugins (sources and presets) with their options."""
        from tbpw.plugin.manager import get_manager

        rows = [{"name": r.cls.name, "plugin": r.plugin, "description": r.cls.description,
                 "options": list(r.cls.Options.model_fields)} for r in get_manager().datasets()]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        for row in rows:
            click.echo(f"{row['name']}: {row['description']}")
            click.echo(f"  options: {', '.join(row['options']) or 'none'}")

    @data.command("fetch-demo")
    def fetch_demo() -> None:
        """Fetch the pinned offline demo assets (SmolLM2-135M, Wikipedia, MMLU dev, substitutes) into the cache."""
        from tbpw.data import assets

        for name, path, description in assets.fetch_demo():
            click.echo(f"{name}\t{path}\n  {description}")
        click.echo(f"note: the SmolLM2 {assets.DEQUANTIZED_NOTE}")

    @data.command("get")
    @click.argument("name")
    @click.option("-o", "--option", "pairs", multiple=True, metavar="KEY=VALUE", help="a dataset option (repeatable; values are YAML scalars)")
    @click.option("--options-json", default=None, help="all options as one JSON object")
    @click.option("--offline", is_flag=True, help="use only what is cached; never reach the network")
    @click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="where derived files go (default: <tbpw cache>/datasets)")
    def get(name: str, pairs: tuple[str, ...], options_json: str | None, offline: bool, cache_dir: str | None) -> None:
        """Materialize dataset NAME with its options; print its path, kind and description."""
        from pathlib import Path

        from tbpw.data.files import DatasetContext
        from tbpw.files import paths
        from tbpw.plugin.manager import get_manager

        dataset = get_manager().datasets().create(name, _parse_options(pairs, options_json))
        context = DatasetContext(Path(cache_dir) if cache_dir else paths.home() / "datasets", offline=offline,
                                 resolve=get_manager().datasets().create)
        produced = dataset.materialize(context)
        click.echo(f"{produced.path}\nkind: {produced.kind}\n{produced.description}")
        if produced.attribution:
            click.echo(f"attribution: {produced.attribution}")
