"""Stage `calibrate`: the measured error table scaled to KL divergence (tbpw.select.calibrate), one table per
strength; its options are the recipe's `calibrate:` (`tbpw.select.options.CalibrateOptions`)."""

from __future__ import annotations

from pathlib import Path

from tbpw.data.files import DatasetFile
from tbpw.files.atomic import write_json
from tbpw.measure.table import ErrorTable
from tbpw.select.options import CalibrateOptions
from tbpw.stages.context import StageContext
from tbpw.stages.cost import ASSUMED_ROLES, Cost, ModelSize
from tbpw.stages.measure import table_bytes

NAME = "calibrate"


def table_name(metric: str, strength: float) -> str:
    """A calibrated table's name among the run's error tables: "<metric>+kld<strength>" (no suffix at 1)."""
    return f"{metric}+kld{'' if strength == 1.0 else f'{strength:g}'}"


def run(ctx: StageContext, model: Path, imatrix: Path, table: Path, text: DatasetFile, options: CalibrateOptions,
        metric: str) -> dict[str, Path]:
    """The measured table (named `metric`) scaled to KL divergence: {table name: path}, one per strength."""
    ngl = ctx.settings.ngl

    def body(folder: Path) -> dict:
        from tbpw.select.calibrate import calibrate, calibrated_table

        measured = ErrorTable.read_json(table)
        sens = calibrate(model, imatrix, text.path, measured, options, threads=ctx.settings.threads, ngl=ngl,
                         scorer=ctx.scorer(model, imatrix, text, options.ctx), store=ctx.store,
                         log=lambda line: ctx.log(f"  calibrate{line}"))
        write_json(folder / "sensitivity.json", sens.to_json())
        tables = {}
        for strength in options.strengths:
            name = table_name(metric, strength)
            file = f"errors-{name.replace('+', '-')}.json"
            calibrated_table(measured, sens, strength).write_json(folder / file)
            tables[name] = file
        return {"tables": tables, "floor_kld": sens.floor_kld}

    out = ctx.stage(NAME, {"model": model, "imatrix": imatrix, "table": table, "text": text.path},
                    {**options.model_dump(mode="json"), "ngl": ngl}, body)
    return {name: out.path(file) for name, file in out.result["tables"].items()}


def probes(size: ModelSize | None, options: CalibrateOptions) -> int:
    """The probe runs: each group at each probe type, and the floor (the background alone) unless that is the
    float model."""
    groups = (size.tensors if size and size.tensors and options.grouping == "tensor"
              else size.roles if size else ASSUMED_ROLES)
    return groups * len(options.probes) + (options.background != "float")


def cost(size: ModelSize | None, options: CalibrateOptions) -> Cost:
    """Each probe written and scored; a calibrated table per strength left, and the sensitivity (about a table)."""
    runs = probes(size, options)
    return Cost(quantizations=runs, klds=runs, tokens=options.ctx * options.chunks * (runs + 1),
                disk=(len(options.strengths) + 1) * table_bytes(size))
