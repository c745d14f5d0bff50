"""`tbpw run`, `tbpw validate` and `tbpw schema`: recipes from the command line."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from tbpw.plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from tbpw.run.pipeline import Pipeline

_LISTED = 12  # stage names an unknown --force lists, before pointing to `--plan` for the rest


def _unknown_stages(pipeline: Pipeline, force: tuple[str, ...], recipe: str) -> list[str]:
    """One line per `--force` value that would force nothing: a stage is named whole (`measure`,
    `quant-4.5bpw-knapsack`) or by a prefix up to a dash (`eval`, `quant-4.5bpw`), as `RunSettings.forced` matches
    them; a typo would otherwise skip every stage and look like a finished run."""
    import difflib

    stages = list(pipeline.graph().tasks.tasks)
    prefixes = list(dict.fromkeys(name[:i] for name in stages for i, ch in enumerate(name) if ch == "-"))
    known = set(stages) | set(prefixes)
    kinds = [p for p in prefixes if "-" not in p]
    listed = ", ".join(stages[:_LISTED]) + (f", ...; {len(stages)} in all, `tbpw run {recipe} --plan` lists them"
                                            if len(stages) > _LISTED else "")
    problems = []
    for name in force:
        if name not in known:
            close = difflib.get_close_matches(name, [*kinds, *stages], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"--force {name} names no stage of this run{hint}: give a stage ({listed}) or the start "
                            f"of several ({', '.join(kinds)})")
    return problems


@hookimpl
def tbpw_register_commands(cli: click.Group) -> None:
    @cli.command()
    @click.argument("recipe", type=click.Path(dir_okay=False))
    @click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="override a recipe field (repeatable)")
    @click.option("--force", "force", multiple=True, metavar="STAGE",
                  help="recompute a stage even if finished (repeatable; 'eval' forces every eval-* stage)")
    @click.option("--executor", "executor", metavar="NAME",
                  help="run the stages with this executor plugin (local, ray, ...) instead of the recipe's; "
                       "its options: --set executor.options.KEY=VALUE")
    @click.option("--plan", "plan_only", is_flag=True,
                  help="print the stages it would run or reuse, the tool runs, disk and time it needs, and stop")
    def run(recipe, overrides, force, executor, plan_only):
        """Run the whole workflow of a recipe; independent stages run at once, finished stages are skipped."""
        from tbpw.errors import Problems
        from tbpw.run.costplan import cost_plan
        from tbpw.run.pipeline import Pipeline
        from tbpw.run.preflight import check, preflight
        from tbpw.run.recipe import read

        sets = [f"executor={{name: {executor}}}", *overrides] if executor else list(overrides)
        log = lambda line: click.echo(line, err=True)  # noqa: E731
        if plan_only:
            planned, problems = read(recipe, sets)
            if planned is None or problems:
                raise Problems(problems)
            planning = Pipeline(planned, force=set(force), log=log, claim=None)
            if force and (unknown := _unknown_stages(planning, force, recipe)):
                raise Problems(unknown)
            # what this machine lacks (disk, build) is said after the plan, which shows how much is needed
            refused = [f"{recipe}: {problem}" for problem in preflight(planned)]
            for line in cost_plan(planning).lines():
                click.echo(line)
            if refused:
                raise Problems(refused)
            return
        loaded = check(recipe, sets)  # every mistake `validate` finds stops the run before any work
        if force and (unknown := _unknown_stages(Pipeline(loaded, claim=None), force, recipe)):
            raise Problems(unknown)  # before the run directory is made or claimed
        pipeline = Pipeline(loaded, force=set(force), log=log)
        for line in cost_plan(pipeline).summary():
            log(line)
        report = pipeline.run()
        click.echo(str(report))

    @cli.command()
    @click.argument("recipe", type=click.Path(dir_okay=False))
    @click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE")
    @click.option("--json", "as_json", is_flag=True, help="print the resolved recipe as JSON")
    def validate(recipe, overrides, as_json):
        """Check a recipe (fields, plugins and their options, files, what the build can run, the model's targets,
        the output folder) without running it; every mistake on its own line."""
        from tbpw.run.preflight import check

        loaded = check(recipe, list(overrides))
        if as_json:
            click.echo(loaded.model_dump_json(indent=1))
        else:
            assert loaded.allocators is not None  # load() fills in the registry's default
            tables = 1 + (len(loaded.calibrate.strengths) if loaded.calibrate else 0)
            choice = (f", choose among {tables * len(loaded.allocators)} plans per target"
                      if loaded.choose else "")
            click.echo(f"{recipe}: ok ({len(loaded.targets)} targets x {len(loaded.allocators)} allocators{choice}, "
                       f"{len(loaded.compare_stock)} stock types, output in {loaded.output_dir})")

    @cli.command()
    def schema():
        """Print the JSON Schema of a recipe, with every installed plugin's options."""
        from tbpw.run.recipe import json_schema

        click.echo(json.dumps(json_schema(), indent=1))
