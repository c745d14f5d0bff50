"""Stage `baseline`: the float model's perplexity on the evaluation text and its logits, which every quant's KL
divergence is measured against (the one use of the evaluation text before the quants are scored)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tbpw.data.files import DatasetFile
from tbpw.evaluate.options import EvaluationOptions
from tbpw.llamacpp.perplexity import base_logits
from tbpw.stages.context import StageContext
from tbpw.stages.cost import Cost, ModelSize

NAME = "baseline"


@dataclass(frozen=True)
class Baseline:
    logits: Path
    ppl: float
    ppl_error: float


def run(ctx: StageContext, model: Path, text: DatasetFile, options: EvaluationOptions) -> Baseline:
    ngl = ctx.settings.ngl

    def body(folder: Path) -> dict:
        base = base_logits(model, text.path, folder / "base.logits", ctx=options.ctx, chunks=options.chunks,
                           threads=options.threads, ngl=ngl, log_path=folder / "perplexity.log", build=ctx.build)
        return {"logits": "base.logits", "ppl": base.ppl, "ppl_error": base.ppl_error}

    # which quants the task benchmarks run on changes nothing here: `scope` stays out of the key
    out = ctx.stage(NAME, {"model": model, "text": text.path},
                    {**options.model_dump(mode="json", exclude={"scope"}), "ngl": ngl}, body)
    return Baseline(out.path(out.result["logits"]), out.result["ppl"], out.result["ppl_error"])


def cost(size: ModelSize | None, options: EvaluationOptions) -> Cost:
    """One pass over the evaluation chunks; llama-perplexity keeps the second half of each chunk's logits."""
    if options.chunks is None:
        return Cost(uncounted=("the baseline and the evaluation runs: evaluation.chunks is not set (the whole text)",))
    logits = options.chunks * (options.ctx // 2) * size.vocab * 2 if size is not None and size.vocab else 0
    return Cost(tokens=options.ctx * options.chunks, disk=logits)
