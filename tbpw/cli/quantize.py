"""`tbpw quantize`: measure, allocate to an exact bpw or size target, and write the file with stock llama-quantize.

    tbpw quantize MODEL.gguf --imatrix I.gguf (--target-bpw X | --target-size N) [--allocator NAME]
                  [--metric NAME] [--pin REGEX=TYPE ...] [--constraints FILE] [--dry-run] [--json] -o OUT.gguf

The errors are measured (and cached) by tbpw.measure unless --error-table or --fork-state gives them.
The plan is saved as OUT.plan.json next to the output; with --dry-run nothing but the plan is written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tbpw.cli.support import existing_file, threads_option
from tbpw.plugin.hookspecs import hookimpl
from tbpw.run.overrides import key_values

if TYPE_CHECKING:
    from rich.console import JustifyMethod


def _pins(pairs: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        # the type never contains "=", the regex may
        pattern, sep, t = pair.rpartition("=")
        if not sep or not pattern or not t:
            raise click.BadParameter(f"{pair!r} is not REGEX=TYPE", param_hint="--pin")
        out[pattern] = t
    return out


def _read_constraints(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    from tbpw.errors import TbpwError

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TbpwError(f"cannot read constraints file {path} ({exc}): give a YAML or JSON file") from exc
    if not isinstance(data, dict):
        raise TbpwError(f"constraints file {path} must hold a mapping (pins, allowed_types, min_bpw, max_bpw, share_type)")
    return data


def checked_constraints(path: str | None, pins: tuple[str, ...], model: str | Path):
    """The constraints of `--constraints FILE` and `--pin REGEX=TYPE` (a flag's pin wins over the file's), checked
    as a recipe's `constraints:` is, with the same messages and before anything is measured: the fields, the
    patterns and types (`Constraints.problems`), and a rule that matches nothing in `model`
    (`Constraints.model_problems`); each mistake is one line starting with where it came from."""
    from tbpw.allocate.constraints import Constraints
    from tbpw.errors import Problems, TbpwError
    from tbpw.model.inventory import ModelInventory

    try:
        from_file = Constraints.parse(_read_constraints(path))
    except TbpwError as exc:
        raise TbpwError(f"constraints file {path}: {exc}") from None
    from_flags = Constraints(pins=_pins(pins))
    sources = ([(str(path), from_file)] if path else []) + ([("--pin", from_flags)] if pins else [])
    problems = [f"{source}: {problem}" for source, c in sources for problem in c.problems()]
    if not problems and sources:
        inventory = ModelInventory.load(model)
        problems = [f"{source}: {problem}" for source, c in sources for problem in c.model_problems(inventory)]
    if problems:
        raise Problems(problems)
    return from_file.model_copy(update={"pins": {**from_file.pins, **from_flags.pins}})


def measure_options(metric: str | None, metric_options: tuple[str, ...], types: str | None, threads: int | None,
                    command: str, **sampling: Any):
    """The measurement's options (tbpw.measure.options.MeasureOptions) from a command's flags: the metric (default:
    the registry's) with its KEY=VALUE options, comma-separated candidate types, threads, sampling fields."""
    from tbpw.cli.support import options_from_flags
    from tbpw.measure.options import MeasureOptions
    from tbpw.plugin.manager import get_manager

    ref = {"name": metric or get_manager().metrics().default_name(),
           "options": key_values(metric_options, flag="--metric-option", example="trim_fraction=0.02")}
    candidates = [t.strip() for t in types.split(",") if t.strip()] if types else None
    return options_from_flags(MeasureOptions, command, metric=ref, candidates=candidates, threads=threads,
                              sampling=sampling, flag_of={"candidates": "--types", "sampling": "--sample-scale"})


def measured_table(model: str | Path, imatrix: str | Path | None, options, *, cache_dir: str | Path | None = None,
                   progress: bool = True):
    """The error table `options` (a MeasureOptions with its metric named) asks for: measured, or from the cache."""
    from tbpw.measure.engine import measure
    from tbpw.plugin.manager import get_manager

    metric = get_manager().metrics().create(options.metric.name, options.metric.options)
    return measure(model, imatrix, metric, options, cache_dir=cache_dir, progress=progress)


def error_table(model: str, imatrix: str, options, *, fork_state: str | None = None, table_file: str | None = None,
                cache_dir: str | None = None, progress: bool = True):
    """The (tensor, candidate) -> (bytes, error) table: a saved one when given, else measured (cached)."""
    if fork_state and table_file:
        from tbpw.errors import TbpwError

        raise TbpwError("give at most one of --fork-state and --error-table")
    if fork_state:
        from tbpw.measure.forkstate import read

        return read(fork_state)
    from tbpw.measure.table import ErrorTable

    if table_file:
        table = ErrorTable.read_json(table_file)
        table.check_model(model, f"error table {table_file}")
        return table
    return measured_table(model, imatrix, options, cache_dir=cache_dir, progress=progress)


@hookimpl
def tbpw_register_commands(cli: click.Group) -> None:
    @cli.command()
    @click.argument("model", type=click.Path(dir_okay=False))
    @click.option("--imatrix", required=True, type=click.Path(dir_okay=False), help="the importance matrix (GGUF or legacy .dat)")
    @click.option("--target-bpw", type=float, default=None, help="bits per weight: 8 x all tensor bytes / all elements, metadata excluded")
    @click.option("--target-size", default=None, help="file size with metadata, e.g. 2.5gib, 900m, 123456 (k, m, g, t are powers of 1024)")
    @click.option("--allocator", default=None, help="allocator plugin (see `tbpw plugins`; default: the registry's default)")
    @click.option("--option", "-O", "options", multiple=True, metavar="KEY=VALUE", help="an allocator option (repeatable)")
    @click.option("--metric", default=None, help="error metric plugin for the measurement (default: the engine's)")
    @click.option("--metric-option", "metric_options", multiple=True, metavar="KEY=VALUE", help="a metric option (repeatable)")
    @click.option("--types", default=None, help="comma-separated candidate types to measure (default: the fork's 20)")
    @click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                  help="where measurements are cached (default: $TBPW_HOME/measure)")
    @click.option("--pin", "pins", multiple=True, metavar="REGEX=TYPE", help="fix matching tensors to a type (repeatable)")
    @click.option("--constraints", "constraints_file", type=click.Path(dir_okay=False), default=None,
                  help="YAML/JSON with pins, allowed_types, min_bpw, max_bpw, share_type")
    @click.option("--error-table", "table_file", type=click.Path(dir_okay=False), default=None,
                  help="take the errors from a table written by `tbpw measure --out` instead of measuring")
    @click.option("--fork-state", type=click.Path(dir_okay=False), default=None,
                  help="take the errors from the fork's --state-file instead of measuring")
    @click.option("--dry-run", is_flag=True, help="print the plan; write no model")
    @click.option("--json", "as_json", is_flag=True, help="print the plan as one JSON object")
    @threads_option("threads for measuring and llama-quantize")
    @click.option("-o", "--output", "out", type=click.Path(dir_okay=False), default=None, help="the GGUF to write")
    def quantize(model, imatrix, target_bpw, target_size, allocator, options, metric, metric_options, types, cache_dir,
                 pins, constraints_file, table_file, fork_state, dry_run, as_json, threads, out):
        """Quantize MODEL to an exact bpw or file-size target with the least measured error."""
        from tbpw.allocate.apply import plan_path_for, written_files
        from tbpw.allocate.service import Planner
        from tbpw.errors import TbpwError
        from tbpw.files.atomic import write_json
        from tbpw.files.outputs import refuse_overwriting_inputs
        from tbpw.model.budget import Target
        from tbpw.plugin.manager import get_manager

        if out is None and not dry_run:
            raise TbpwError("no output file: give -o OUT.gguf (or --dry-run to only print the plan)")
        for path, what in ((model, "model"), (imatrix, "imatrix")):
            existing_file(path, f"{what} file")
        if out is not None:
            refuse_overwriting_inputs(written_files(out) if not dry_run else {"plan file": plan_path_for(out)},
                                      {"model": model, "imatrix": imatrix, "constraints file": constraints_file,
                                       "error table": table_file, "fork state file": fork_state})
        target = Target.parse(bpw=target_bpw, size=target_size)
        registry = get_manager().allocators()
        plugin = registry.create(allocator or registry.default_name(),
                                 key_values(options, flag="--option", example="bucket_bytes=4096"))
        plugin.check_ready()
        parsed = checked_constraints(constraints_file, pins, model)  # a mistake there fails before any measuring
        measuring = measure_options(metric, metric_options, types, threads, "quantize")
        table = error_table(model, imatrix, measuring, fork_state=fork_state, table_file=table_file,
                            cache_dir=cache_dir)
        measured_by = f"fork state {Path(fork_state).name}" if fork_state else getattr(table, "meta", {}).get("metric")
        planner = Planner(Path(model), Path(imatrix), parsed, log_dir=Path(out).parent if out else None,
                          threads=threads, provenance={"metric": str(measured_by)} if measured_by else {})
        plan = planner.plan(table, target, plugin)

        result = plan.to_json()
        if dry_run:
            if out:
                write_json(plan_path_for(out), result)
        else:
            applied = planner.write(plan, out)
            result.update({"output": str(applied.path), "file_bytes": applied.file_bytes, "verified": True,
                           "log": str(applied.log_path)})
        if as_json:
            click.echo(json.dumps(result))
            return
        _print_plan(plan, planner.inventory)
        if plan.shortfall:
            click.echo(f"note: the plan {plan.shortfall}", err=True)
        if not dry_run:
            click.echo(f"wrote {applied.path} ({applied.file_bytes} bytes, {applied.achieved_bpw:.4f} bpw; every "
                       f"tensor verified as planned); plan: {applied.plan_path}")


def _print_plan(plan, inventory) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (("tensor", "left"), ("type", "left"), ("bytes", "right"),
                                                     ("bpw", "right"), ("error", "right"), ("", "left"))
    for col, justify in columns:
        table.add_column(col, justify=justify)
    elements = {t.name: t.n_elements for t in inventory.tensors}
    for t in plan.tensors:
        error = "" if t.error is None or not math.isfinite(t.error) else f"{t.error:.6g}"
        note = {"pinned": "pinned", "fixed": "kept"}.get(t.source, "")
        table.add_row(t.name, t.type, str(t.bytes), f"{8.0 * t.bytes / elements[t.name]:.4f}", error, note)
    console = Console(width=120)
    console.print(table)
    target = f"{plan.target.bpw} bpw" if plan.target.bpw is not None else f"{plan.target.size} bytes"
    console.print(f"allocator {plan.allocator}: target {target}, achieved {plan.achieved_bpw:.4f} bpw, "
                  f"{plan.total_bytes} tensor bytes, {plan.file_bytes} file bytes, total error {plan.total_error:.6g}",
                  highlight=False)
