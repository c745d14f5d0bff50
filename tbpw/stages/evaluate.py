"""Stage `eval-<quant>` (and `eval-<quant>+tasks`): a quant scored by the recipe's evaluator plugins (KL divergence
against the baseline's logits, perplexity, task benchmarks) on the evaluation text; its options are the recipe's
`evaluation:` (`tbpw.evaluate.options.EvaluationOptions`).

With `evaluation.scope: selected`, a quant's evaluation is two stages: the evaluators the selection ranks by on
every quant, the others (`+tasks`) only on each target's selected quant (tbpw.run.selection decides which).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tbpw.data.files import DatasetFile
from tbpw.evaluate.context import EvalContext
from tbpw.evaluate.options import EvaluationOptions
from tbpw.options import PluginRef
from tbpw.stages.baseline import Baseline
from tbpw.stages.context import StageContext
from tbpw.stages.cost import Cost, ModelSize
from tbpw.stages.quant import Quant

Part = Literal["all", "select", "tasks"]


@dataclass(frozen=True)
class Evaluating:
    """One evaluation stage's evaluators (all of the recipe's, or one part of them) and the evaluation options."""

    evaluators: tuple[PluginRef, ...]
    options: EvaluationOptions
    part: Part = "all"


def name(quant: str, part: Part = "all") -> str:
    return f"eval-{quant}{'+tasks' if part == 'tasks' else ''}"


def run(ctx: StageContext, evaluating: Evaluating, quant: Quant, baseline: Baseline,
        data: dict[str, DatasetFile]) -> dict[str, float]:
    options, ngl = evaluating.options, ctx.settings.ngl
    evaluators = [ctx.plugin("evaluator", ref) for ref in evaluating.evaluators]

    def body(folder: Path) -> dict:
        context = EvalContext(model=quant.path, log_dir=folder, base_logits=baseline.logits, datasets=data,
                              ctx=options.ctx, chunks=options.chunks, task_ctx=options.task_ctx, ngl=ngl,
                              threads=options.threads)
        metrics: dict[str, float] = {}
        for evaluator in evaluators:
            metrics.update(evaluator.evaluate(context))
        return metrics

    # which quants the tasks run on changes nothing in one quant's numbers: it stays out of the key
    return ctx.stage(name(quant.name, evaluating.part),
                     {"model": quant.path, "logits": baseline.logits, **{f"data-{k}": v.path for k, v in data.items()}},
                     {"evaluators": list(evaluating.evaluators),
                      "evaluation": options.model_dump(mode="json", exclude={"scope"}), "ngl": ngl}, body).result


def cost(size: ModelSize | None, evaluating: Evaluating, alternatives: str | None = None) -> Cost:
    """One run of each evaluator, each a pass over the evaluation chunks (a task evaluator's tasks are not counted);
    `alternatives`: it runs for one of the quants sharing that key (a target's selected one)."""
    runs, chunks = len(evaluating.evaluators), evaluating.options.chunks
    tokens = evaluating.options.ctx * chunks * runs if chunks is not None else 0
    uncounted = ("the baseline and the evaluation runs: evaluation.chunks is not set (the whole text)",) if chunks is None else ()
    return Cost(evaluations=runs, tokens=tokens, alternatives=f"{evaluating.part} of {alternatives}" if alternatives else None,
                uncounted=uncounted if runs else ())
