"""`tbpw calibrate` and `tbpw choose`: the quality levers of docs/quality.md, step by step.

    tbpw calibrate MODEL.gguf --imatrix I.gguf --error-table T.json -f CALIBRATION.txt [--probe Q3_K ...]
                   [--grouping role|tensor] [--strength 1.0] [--ctx 512] [--chunks 8] [--background float|Q8_0]
                   [--no-store] -o CALIBRATED.json
    tbpw choose MODEL.gguf --imatrix I.gguf (--target-bpw X | --target-size N) --error-table T.json ...
                [--allocator knapsack --allocator lagrangian] -f CALIBRATION.txt [--chunks 16] [--screen-chunks 2]
                [--finalists 3] [--margin 0.02] [--refine-rounds N] [--pin REGEX=TYPE ...] [--constraints FILE]
                [--no-store] [--json] -o OUT.gguf

Their flags are the fields of the options a recipe's `calibrate:` and `choose:` take (tbpw.select.options), with the
same defaults. `calibrate` writes an error table rescaled to measured KL divergence (tbpw.select.calibrate), usable wherever a
table is (`tbpw quantize --error-table`, `tbpw choose`). `choose` plans the target with every allocator on
every table, scores each plan against the float model on the calibration text and writes the best one
(tbpw.select.choose.choose); the tools' logs stay in OUT's `<name>.choose/` folder. Both write their models
from the tensor store (tbpw.quantize.store) unless `--no-store`, and keep the float logits and the scores in
the calibration cache (tbpw.select.scoring), so a second target or a rerun scores only what is new.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from tbpw.cli.quantize import checked_constraints
from tbpw.cli.support import console, default, existing_file, options_from_flags, threads_option
from tbpw.errors import TbpwError
from tbpw.plugin.hookspecs import hookimpl
from tbpw.run.overrides import key_values
from tbpw.select.options import CalibrateOptions, ChooseOptions


def _table_paths(specs: tuple[str, ...]) -> dict[str, Path]:
    """NAME=PATH or PATH (named after the file) -> {name: path}."""
    paths: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if name in paths:
            raise TbpwError(f"two error tables are named {name!r}: name them, --error-table NAME=PATH")
        paths[name] = existing_file(path, "error table")
    return paths


def _tables(paths: dict[str, Path], model: Path) -> dict:
    """{name: ErrorTable}, each checked to belong to `model`."""
    from tbpw.measure.table import ErrorTable

    tables = {}
    for name, path in paths.items():
        tables[name] = ErrorTable.read_json(path)
        tables[name].check_model(model, f"error table {path}")
    return tables


@hookimpl
def tbpw_register_commands(cli: click.Group) -> None:
    @cli.command()
    @click.argument("model")
    @click.option("--imatrix", required=True, help="the importance matrix the table was measured with")
    @click.option("--error-table", "table_file", required=True, help="the table to calibrate (`tbpw measure --out`)")
    @click.option("-f", "--file", "text", required=True, help="CALIBRATION text (never the text you evaluate on)")
    @click.option("--probe", "probes", multiple=True, default=default(CalibrateOptions, "probes"), show_default=True,
                  help="probe type: each group is quantized alone to it (repeatable)")
    @click.option("--grouping", type=click.Choice(["role", "tensor"]), default=default(CalibrateOptions, "grouping"),
                  show_default=True, help="one measurement per role across layers, or per tensor")
    @click.option("--strength", type=float, default=default(CalibrateOptions, "strengths")[0], show_default=True,
                  help="scale ** strength: 1 trusts the measured scales, 0.5 hedges against their noise")
    @click.option("--ctx", type=int, default=default(CalibrateOptions, "ctx"), show_default=True)
    @click.option("--chunks", type=int, default=default(CalibrateOptions, "chunks"), show_default=True)
    @click.option("--background", default=default(CalibrateOptions, "background"), show_default=True,
                  help="the type the tensors outside the probed group keep: float, or e.g. Q8_0")
    @click.option("--store/--no-store", default=True, show_default=True,
                  help="write the probes from the tensor store (else llama-quantize writes each)")
    @threads_option()
    @click.option("-o", "--output", "out", required=True, help="the calibrated table (JSON)")
    def calibrate(model, imatrix, table_file, text, probes, grouping, strength, ctx, chunks, background, store, threads,
                  out):
        """Rescale an error table to the KL divergence each group of tensors measurably costs."""
        from tbpw.files.outputs import refuse_overwriting_inputs
        from tbpw.measure.table import ErrorTable
        from tbpw.quantize.store import TensorStore
        from tbpw.select.calibrate import calibrate as measure_sensitivity
        from tbpw.select.calibrate import calibrated_table
        from tbpw.select.scoring import Scorer

        options = options_from_flags(CalibrateOptions, "calibrate", probes=list(probes), grouping=grouping,
                                     strengths=[strength], ctx=ctx, chunks=chunks, background=background,
                                     flag_of={"probes": "--probe", "strengths": "--strength"})
        refuse_overwriting_inputs({"-o": out}, {"model": model, "imatrix": imatrix, "error table": table_file,
                                                "calibration text": text})
        table = ErrorTable.read_json(existing_file(table_file, "error table"))
        model, imatrix, text = (existing_file(model, "model"), existing_file(imatrix, "imatrix"),
                                existing_file(text, "text"))
        table.check_model(model, f"error table {table_file}")
        sens = measure_sensitivity(model, imatrix, text, table, options, threads=threads,
                                   scorer=Scorer(model, text, imatrix=imatrix, ctx=options.ctx, chunks=options.chunks,
                                                 threads=threads),
                                   store=TensorStore(threads=threads) if store else None,
                                   log=lambda line: console.print(line, highlight=False))
        calibrated_table(table, sens, options.strengths[0]).write_json(out)
        scales = sens.group_scales()
        for group in sens.groups:
            measured = ", ".join(f"{t} +{sens.measured[group][t]:.6f} KLD (scale {scales[group][t]:.4g})"
                                 for t in sens.probe_types)
            click.echo(f"{group}: {measured}")
        source = "cache" if sens.meta.get("cached") else "measured"
        click.echo(f"{len(sens.groups)} groups ({source}; float requantization KLD {sens.floor_kld:.6f}); "
                   f"calibrated table written to {out}")

    @cli.command()
    @click.argument("model")
    @click.option("--imatrix", required=True, help="the importance matrix (GGUF or legacy .dat)")
    @click.option("--target-bpw", type=float, default=None, help="bits per weight, metadata excluded")
    @click.option("--target-size", default=None, help="file size with metadata, e.g. 2.5gib")
    @click.option("--error-table", "tables", multiple=True, required=True, metavar="[NAME=]PATH",
                  help="an error table to plan on (repeatable: measured, calibrated, ...)")
    @click.option("--allocator", "allocators", multiple=True,
                  help="an allocator plugin to plan with (repeatable; default: the registry's default allocator)")
    @click.option("-f", "--file", "text", required=True, help="CALIBRATION text the plans are scored on")
    @click.option("--ctx", type=int, default=default(ChooseOptions, "ctx"), show_default=True)
    @click.option("--chunks", type=int, default=default(ChooseOptions, "chunks"), show_default=True)
    @click.option("--screen-chunks", type=int, default=default(ChooseOptions, "screen_chunks"), show_default=True,
                  help="score in rounds of this many chunks: every plan on the first, then only the leader and the "
                       "plans tied with it, until one is left or all chunks are scored (0: every plan on every chunk)")
    @click.option("--finalists", type=int, default=default(ChooseOptions, "finalists"), show_default=True,
                  help="at most this many plans go on from a round")
    @click.option("--margin", type=float, default=default(ChooseOptions, "margin"), show_default=True,
                  help="after a round, a plan goes on only if it may beat the leader by more than this part of the "
                       "leader's KLD (0: by anything)")
    @click.option("--refine-rounds", type=int, default=default(ChooseOptions, "refine_rounds"), show_default=True,
                  help="then rounds of measured type swaps, each kept only when the calibration KLD drops")
    @click.option("--refine-tries", type=int, default=default(ChooseOptions, "refine_tries"), show_default=True)
    @click.option("--pin", "pins", multiple=True, metavar="REGEX=TYPE", help="fix matching tensors to a type (repeatable)")
    @click.option("--constraints", "constraints_file", default=None, help="YAML/JSON with pins, allowed_types, ...")
    @click.option("--option", "-O", "options", multiple=True, metavar="ALLOCATOR.KEY=VALUE",
                  help="an allocator's option (repeatable)")
    @threads_option()
    @click.option("--store/--no-store", default=True, show_default=True,
                  help="write the plans from the tensor store (else llama-quantize writes each)")
    @click.option("--json", "as_json", is_flag=True, help="print the scores and the choice as one JSON object")
    @click.option("-o", "--output", "out", required=True, help="the GGUF to write")
    def choose(model, imatrix, target_bpw, target_size, tables, allocators, text, ctx, chunks, screen_chunks, finalists,
               margin, refine_rounds, refine_tries, pins, constraints_file, options, threads, store, as_json, out):
        """Plan a target with every allocator on every table; write the plan with the lowest calibration KLD."""
        from tbpw.allocate.apply import plan_path_for
        from tbpw.allocate.service import Planner
        from tbpw.files.outputs import refuse_overwriting_inputs
        from tbpw.model.budget import Target
        from tbpw.plugin.manager import get_manager
        from tbpw.select.choose import choose as choose_plan

        choosing = options_from_flags(ChooseOptions, "choose", ctx=ctx, chunks=chunks, screen_chunks=screen_chunks,
                                      finalists=finalists, margin=margin, refine_rounds=refine_rounds,
                                      refine_tries=refine_tries)
        table_paths = _table_paths(tables)
        refuse_overwriting_inputs({"-o": out, "plan file": plan_path_for(out)},
                                  {"model": model, "imatrix": imatrix, "calibration text": text,
                                   "constraints file": constraints_file,
                                   **{f"error table {name}": path for name, path in table_paths.items()}})
        target = Target.parse(bpw=target_bpw, size=target_size)
        registry = get_manager().allocators()
        allocators = allocators or (registry.default_name(),)
        per_allocator: dict[str, dict] = {a: {} for a in allocators}
        for key, value in key_values(options, flag="--option", example="bucket_bytes=4096").items():
            allocator, dot, option = key.partition(".")
            if not dot or allocator not in per_allocator:
                raise TbpwError(f"--option {key}: write ALLOCATOR.KEY=VALUE for one of {', '.join(allocators)}")
            per_allocator[allocator][option] = value
        plugins = [registry.create(a, per_allocator[a]) for a in dict.fromkeys(allocators)]
        model = existing_file(model, "model")
        constraints = checked_constraints(constraints_file, pins, model)
        out = Path(out)
        work = out.with_name((out.name[:-5] if out.name.endswith(".gguf") else out.name) + ".choose")
        from tbpw.quantize.store import TensorStore
        from tbpw.select.scoring import Scorer

        planner = Planner(model, existing_file(imatrix, "imatrix"), constraints,
                          log_dir=work, threads=threads, store=TensorStore(threads=threads) if store else None)
        text = existing_file(text, "text")
        say = None if as_json else lambda line: console.print(line, highlight=False)
        choice = choose_plan(planner, _tables(table_paths, Path(model)), plugins, target, text, out, work, choosing,
                             log=say, scorer=Scorer(planner.model, text, imatrix=planner.imatrix, ctx=choosing.ctx,
                                                    chunks=choosing.chunks, threads=threads, log=say))
        result = {**choice.to_json(), "output": str(out), "achieved_bpw": choice.plan.achieved_bpw}
        if as_json:
            click.echo(json.dumps(result))
            return
        swaps = f", then {len(choice.refined)} measured swaps" if choice.refined else ""
        click.echo(f"chose {choice.best}{swaps}: calibration KLD {choice.score.kld_mean:.6f}, "
                   f"{choice.plan.achieved_bpw:.4f} bpw; wrote {out} (logs in {work})")
