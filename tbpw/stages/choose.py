"""Stage `quant-<target>-choose`: per target, every allocator's plan on every error table, scored against the
float model on CALIBRATION text, the best one (optionally refined by measured swaps) written as the target's
quant (tbpw.select.choose); its options are the recipe's `choose:` (`tbpw.select.options.ChooseOptions`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tbpw.allocate.constraints import Constraints
from tbpw.data.files import DatasetFile
from tbpw.measure.table import ErrorTable
from tbpw.model.inventory import ModelInventory
from tbpw.options import PluginRef
from tbpw.select.options import CalibrateOptions, ChooseOptions
from tbpw.stages.context import StageContext
from tbpw.stages.cost import Cost, ModelSize
from tbpw.stages.quant import Quant
from tbpw.stages.targets import RecipeTarget, budget, estimated_bytes


@dataclass(frozen=True)
class Choosing:
    """What one target's choice takes from the recipe."""

    target: RecipeTarget
    options: ChooseOptions
    allocators: tuple[PluginRef, ...]
    constraints: Constraints
    metric: str  # the measured table's name (its metric's)


def name(target: RecipeTarget) -> str:
    return f"quant-{target.label}-choose"


def run(ctx: StageContext, choosing: Choosing, model: Path, imatrix: Path, table: Path,
        calibrated: dict[str, Path] | None, stock: Quant | None, written: dict[str, Quant],
        text: DatasetFile) -> Quant:
    """`written` holds the target's quants already made on the measured table (allocator -> quant): they are scored
    as they are, not written again."""
    options, this, ngl = choosing.options, name(choosing.target), ctx.settings.ngl
    goal = budget(choosing.target, stock)
    tables = {choosing.metric: table, **(calibrated or {})}
    if options.tables == "calibrated" and len(tables) > 1:  # the measured table is the first; calibrated ones follow
        tables = dict(list(tables.items())[1:])
        written = {}

    def body(folder: Path) -> dict:
        from tbpw.select.choose import candidate_name, choose

        choice = choose(ctx.planner(model, imatrix, folder, choosing.constraints, text),
                        {n: ErrorTable.read_json(p) for n, p in tables.items()},
                        [ctx.plugin("allocator", a) for a in choosing.allocators], goal, text.path,
                        folder / "model.gguf", folder / "work", options,
                        written={candidate_name(a, choosing.metric): q.path for a, q in written.items()}, ngl=ngl,
                        scorer=ctx.scorer(model, imatrix, text, options.ctx),
                        log=lambda line: ctx.log(f"  choose{line}"))
        inventory = ModelInventory.load(folder / "model.gguf")
        return {"model": "model.gguf", "bpw": inventory.bpw(), "size_bytes": (folder / "model.gguf").stat().st_size,
                "types": inventory.types(), **choice.to_json()}

    inputs = {"model": model, "imatrix": imatrix, "text": text.path,
              **{f"table {n}": p for n, p in tables.items()}, **{f"quant {a}": q.path for a, q in written.items()}}
    out = ctx.stage(this, inputs, {"target": goal.to_json(), "allocators": list(choosing.allocators), "ngl": ngl,
                                   "constraints": choosing.constraints, "choose": options}, body)
    return Quant(this, "tbpw", out.path("model.gguf"), out.result["bpw"], out.result["size_bytes"],
                 target=choosing.target.label, allocator="choose", types=out.result["types"], note=note(out.result))


def note(result: dict) -> str:
    """The report's line on how the choice went."""
    distinct = result.get("distinct", len(result["calibration_kld"]))  # (results of earlier versions: the last round)
    total = distinct + len(result["duplicates"])
    swaps = f", then {len(result['refined'])} measured swaps" if result["refined"] else ""
    why = (f"all {total} plans were the same" if distinct == 1 else
           f"lowest calibration KLD of {distinct} distinct plans among {total}")
    return f"chose {result['chosen']} ({why}){swaps}"


def candidates(choosing: Choosing, calibrate: CalibrateOptions | None) -> int:
    """The plans one choice scores: each allocator on each table it is given, and the refinement's swaps."""
    options = choosing.options
    tables = (len(calibrate.strengths) if calibrate is not None and options.tables == "calibrated"
              else 1 + (len(calibrate.strengths) if calibrate is not None else 0))
    return tables * len(choosing.allocators) + options.refine_rounds * options.refine_tries


def cost(size: ModelSize | None, choosing: Choosing, calibrate: CalibrateOptions | None) -> Cost:
    """Each candidate is written and scored on the first round; at most the finalists go on through every later
    round (a run per round; the rounds stop once one plan is left); a lone candidate is scored once, on all the
    chunks. The chosen plan stays; the candidate being scored is in flight."""
    options, plans = choosing.options, candidates(choosing, calibrate)
    screened = bool(options.screen_chunks) and plans > 1
    finals = min(options.finalists, plans) if options.screen_chunks else 0
    later_rounds = math.ceil(options.chunks / options.screen_chunks) - 1 if screened else 0
    rest = options.chunks - options.screen_chunks if options.screen_chunks else 0
    tokens = options.ctx * (plans * (options.screen_chunks or options.chunks) + finals * rest)
    quant = estimated_bytes(choosing.target, size)
    return Cost(quantizations=plans, klds=plans + finals * later_rounds, klds_at_most=later_rounds > 0, tokens=tokens,
                disk=quant, in_flight=quant)
