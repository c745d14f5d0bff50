"""Stage `stock-<type>`: stock llama-quantize's own mixture of a type, with the run's imatrix, as a reference at
its size (and the size a `stock:` target aims at)."""

from __future__ import annotations

from pathlib import Path

from tbpw.allocate.constraints import Constraints
from tbpw.data.files import DatasetFile
from tbpw.llamacpp.quantize import quantize
from tbpw.model.inventory import ModelInventory
from tbpw.stages.context import StageContext
from tbpw.stages.cost import Cost, ModelSize, stock_bytes
from tbpw.stages.quant import Quant


def name(qtype: str) -> str:
    return f"stock-{qtype}"


def run(ctx: StageContext, model: Path, imatrix: Path, qtype: str, calibration: DatasetFile) -> Quant:
    def body(folder: Path) -> dict:
        out = folder / "model.gguf"
        # llama-quantize's own mixture: no allocator and no metric of tbpw's chose its types
        kv = ctx.planner(model, imatrix, folder, Constraints(), calibration).record(target=f"stock {qtype}", metric="")
        quantize(model, out, imatrix=imatrix, base_type=qtype, kv=kv, log_path=folder / "quantize.log", build=ctx.build)
        inv = ModelInventory.load(out)
        return {"model": "model.gguf", "bpw": inv.bpw(), "size_bytes": out.stat().st_size, "types": inv.types()}

    out = ctx.stage(name(qtype), {"model": model, "imatrix": imatrix}, {"type": qtype}, body)
    return Quant(name(qtype), "stock", out.path("model.gguf"), out.result["bpw"], out.result["size_bytes"],
                 types=out.result["types"])


def cost(size: ModelSize | None, qtype: str) -> Cost:
    return Cost(quantizations=1, disk=stock_bytes(qtype, size) if size is not None else 0)
