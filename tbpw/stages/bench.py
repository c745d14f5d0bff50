"""Stage `bench-<quant>`: llama-bench's speed of a quant (prompt processing, token generation); its options are the
recipe's `bench:`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tbpw.llamacpp.bench import bench, markdown_rows, speeds
from tbpw.options import TOOL_INT, Strict
from tbpw.stages.context import StageContext
from tbpw.stages.cost import Cost, ModelSize
from tbpw.stages.quant import Quant


class BenchOptions(Strict):
    enabled: bool = True
    pp: int = Field(512, ge=1, le=TOOL_INT)
    tg: int = Field(128, ge=1, le=TOOL_INT)
    pg: tuple[int, int] | None = (1024, 1024)
    repetitions: int = Field(5, ge=1, le=TOOL_INT)
    threads: int | None = Field(None, ge=1)
    ngl: int | None = Field(None, ge=0)  # GPU layers for llama-bench alone (default: the recipe's `ngl`)


def name(quant: str) -> str:
    return f"bench-{quant}"


def gpu_layers(options: BenchOptions, ngl: int | None) -> int | None:
    """llama-bench's GPU layers: its own, else the run's."""
    return options.ngl if options.ngl is not None else ngl


def run(ctx: StageContext, options: BenchOptions, quant: Quant) -> dict:
    ngl = gpu_layers(options, ctx.settings.ngl)

    def body(folder: Path) -> dict:
        result = bench(quant.path, pp=options.pp, tg=options.tg, pg=options.pg, repetitions=options.repetitions,
                       threads=options.threads, ngl=ngl, log_path=folder / "bench.log", build=ctx.build)
        return {"speeds": speeds(result), "rows": markdown_rows(result)}

    # "rows": results of earlier versions held the speeds alone, and rerun
    return ctx.stage(name(quant.name), {"model": quant.path},
                     {**options.model_dump(mode="json"), "ngl": ngl, "rows": True}, body).result


def cost(size: ModelSize | None, options: BenchOptions, alternatives: str | None = None) -> Cost:
    """`repetitions` of each test; `alternatives`: it runs for one of the quants sharing that key."""
    tokens = options.repetitions * (options.pp + options.tg + sum(options.pg or []))
    return Cost(benches=1, tokens=tokens, alternatives=f"bench of {alternatives}" if alternatives else None)
