"""Stage `imatrix`: the importance matrix of the model on the calibration text (stock llama-imatrix, or tbpw's
collector, which adds E[a]); its options are the recipe's `imatrix:`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tbpw.data.files import DatasetFile
from tbpw.options import TOOL_INT, Strict
from tbpw.stages.context import StageContext
from tbpw.stages.cost import Cost, ModelSize

NAME = "imatrix"


class ImatrixOptions(Strict):
    collector: Literal["stock", "tbpw"] = "stock"
    ctx: int = Field(512, ge=32, le=TOOL_INT)
    chunks: int | None = Field(None, ge=1, le=TOOL_INT)
    process_output: bool = False


def run(ctx: StageContext, model: Path, text: DatasetFile, options: ImatrixOptions) -> Path:
    ngl = ctx.settings.ngl

    def body(folder: Path) -> dict:
        from tbpw.llamacpp.imatrix import make_imatrix

        make_imatrix(model, text.path, folder / "imatrix.gguf", collector=options.collector, chunks=options.chunks,
                     ctx=options.ctx, ngl=ngl, log_path=folder / "imatrix.log",
                     extra_args=["--process-output"] if options.process_output else [], build=ctx.build)
        return {"imatrix": "imatrix.gguf"}

    return ctx.stage(NAME, {"model": model, "text": text.path}, {**options.model_dump(mode="json"), "ngl": ngl},
                     body).path("imatrix.gguf")


def cost(size: ModelSize | None, options: ImatrixOptions) -> Cost:
    """A pass over the calibration chunks; the file holds 3 float32 statistics per input column (E[a²], E[a] with
    tbpw's collector, the counts)."""
    disk = 3 * 4 * size.imatrix_values if size is not None else 0
    if options.chunks is None:
        return Cost(disk=disk, uncounted=("the imatrix: imatrix.chunks is not set (the whole calibration text)",))
    return Cost(tokens=options.ctx * options.chunks, disk=disk)
