"""Stage `quant-<target>-<allocator>`: one allocator's plan for one target on the measured error table, written
and verified (from the tensor store, or by llama-quantize)."""

from __future__ import annotations

from pathlib import Path

from tbpw.allocate.constraints import Constraints
from tbpw.data.files import DatasetFile
from tbpw.measure.table import ErrorTable
from tbpw.model.inventory import ModelInventory
from tbpw.options import PluginRef
from tbpw.stages.context import StageContext
from tbpw.stages.cost import Cost, ModelSize
from tbpw.stages.quant import Quant
from tbpw.stages.targets import RecipeTarget, budget, estimated_bytes


def name(target: RecipeTarget, allocator: str) -> str:
    return f"quant-{target.label}-{allocator}"


def run(ctx: StageContext, model: Path, imatrix: Path, table: Path, target: RecipeTarget, stock: Quant | None,
        allocator: PluginRef, constraints: Constraints, calibration: DatasetFile) -> Quant:
    this = name(target, allocator.name)
    goal = budget(target, stock)

    def body(folder: Path) -> dict:
        planner = ctx.planner(model, imatrix, folder, constraints, calibration)
        plan = planner.plan(ErrorTable.read_json(table), goal, ctx.plugin("allocator", allocator))
        applied = planner.write(plan, folder / "model.gguf", log_path=folder / "quantize.log")
        written = ModelInventory.load(applied.path)
        if plan.shortfall:
            ctx.log(f"  note: {this} {plan.shortfall}")
        return {"model": "model.gguf", "plan": applied.plan_path.name, "bpw": applied.achieved_bpw,
                "size_bytes": applied.file_bytes, "types": written.types(), "shortfall": plan.shortfall}

    out = ctx.stage(this, {"model": model, "imatrix": imatrix, "table": table},
                    {"target": goal.to_json(), "allocator": allocator, "constraints": constraints}, body)
    return Quant(this, "tbpw", out.path("model.gguf"), out.result["bpw"], out.result["size_bytes"],
                 target=target.label, allocator=allocator.name, types=out.result["types"],
                 note=out.result.get("shortfall") or "")


def cost(size: ModelSize | None, target: RecipeTarget) -> Cost:
    return Cost(quantizations=1, disk=estimated_bytes(target, size))
