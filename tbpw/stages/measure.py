"""Stage `measure`: the error table (every quantizable tensor x candidate type: exact bytes and the metric's
error), measured through libggml and cached (tbpw.measure.engine); its options are the recipe's `measure:`
(`tbpw.measure.options.MeasureOptions`)."""

from __future__ import annotations

from pathlib import Path

from tbpw.measure.options import MeasureOptions
from tbpw.stages.context import StageContext
from tbpw.stages.cost import Cost, ModelSize

NAME = "measure"
# `tbpw measure` of a 26B-A4B layout: 2.4 plain quantizations of work (docs/results/scale.md)
WORK_IN_QUANTIZATIONS = 2.5


def run(ctx: StageContext, model: Path, imatrix: Path, options: MeasureOptions) -> Path:
    def body(folder: Path) -> dict:
        from tbpw.measure.engine import measure

        assert options.metric is not None  # the recipe fills in the registry's default
        metric = ctx.plugin("metric", options.metric)
        table = measure(model, imatrix, metric, options,
                        store=ctx.store.source(model, imatrix) if ctx.store is not None else None)
        # how and where it was obtained, not what it is (a cached table records the paths of the run that measured
        # it): the same table gives the same bytes, and the stages after it the same keys
        for volatile in ("cached", "seconds", "resumed_tensors", "model_path", "imatrix_path"):
            table.meta.pop(volatile, None)
        table.write_json(folder / "errors.json")
        return {"table": "errors.json", "tensors": len(table.tensors)}

    return ctx.stage(NAME, {"model": model, "imatrix": imatrix}, options, body).path("errors.json")


def metric_name(options: MeasureOptions) -> str:
    """The measured table's name among a run's error tables: its metric's."""
    assert options.metric is not None  # the recipe fills in the registry's default
    return options.metric.name


# An error table's JSON: about this many bytes per (tensor, candidate type), for the 20 default candidates.
TABLE_BYTES_PER_TENSOR = 20 * 100


def table_bytes(size: ModelSize | None) -> int:
    return TABLE_BYTES_PER_TENSOR * size.tensors if size is not None else 0


def cost(size: ModelSize | None) -> Cost:
    return Cost(quantize_work=WORK_IN_QUANTIZATIONS, disk=table_bytes(size))


