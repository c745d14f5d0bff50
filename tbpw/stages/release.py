"""Stage `release-<target>` (`keep: chosen`): the GGUFs of one target's quants other than its selected one are
deleted once every task that reads them is done; their stages stay finished (tbpw.stages.rundir's release), and
their numbers stay in the report."""

from __future__ import annotations

from tbpw.stages.context import StageContext
from tbpw.stages.cost import Cost, ModelSize
from tbpw.stages.quant import Quant
from tbpw.stages.targets import RecipeTarget, estimated_bytes


def name(target: RecipeTarget) -> str:
    return f"release-{target.label}"


def run(ctx: StageContext, quants: dict[str, Quant], keep: str) -> list[str]:
    """Delete the files of `quants` but `keep`'s; returns the quants whose file is gone."""
    gone = [name for name in quants if name != keep]
    for name in gone:
        if ctx.run_dir.release(quants[name].path):
            ctx.log(f"deleted {name}/{quants[name].path.name}  (keep: chosen; {keep} is kept)")
    return gone


def cost(size: ModelSize | None, target: RecipeTarget, plans: int) -> Cost:
    """The target's `plans` quants exist until this stage deletes all but one."""
    freed = estimated_bytes(target, size) * (plans - 1)
    return Cost(disk=-freed, held=freed)
