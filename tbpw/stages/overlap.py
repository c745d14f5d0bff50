"""Stage `overlap`: how much of the evaluation text the calibration text already holds (tbpw.data.overlap). The
calibration text chooses the plans and the evaluation text reports them, so a shared passage flatters every
number of the report; the report's method says how much they share, and the run warns above
`tbpw.data.overlap.WARN_SHARE`."""

from __future__ import annotations

from pathlib import Path

from tbpw.data.files import DatasetFile
from tbpw.data.overlap import WARN_SHARE, overlap
from tbpw.stages.context import StageContext
from tbpw.stages.cost import Cost, ModelSize

NAME = "overlap"


def run(ctx: StageContext, calibration: DatasetFile, evaluation: DatasetFile) -> dict:
    def body(folder: Path) -> dict:
        return overlap(calibration.path, evaluation.path).to_json()

    out = ctx.stage(NAME, {"calibration": calibration.path, "evaluation": evaluation.path}, {}, body)
    found = out.result
    if found["sequences"] > WARN_SHARE or found["lines"] > WARN_SHARE:
        ctx.log(f"warning: the calibration and evaluation texts overlap: {found['sequences']:.1%} of the evaluation "
                f"text's {found['words']}-word sequences and {found['lines']:.1%} of its long lines occur in the "
                "calibration text (over "
                f"{WARN_SHARE:.0%}): the report's numbers are flattered; give texts that do not share passages")
    return found


def cost(size: ModelSize | None) -> Cost:
    """Reading both texts once."""
    return Cost()
