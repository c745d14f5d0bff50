"""Built-in evaluators: KL divergence against the baseline logits, HellaSwag, WinoGrande, multiple choice.

Each runs llama-perplexity in one of its modes on the quantized model and returns flat named numbers;
the names are the report's columns.
"""

from __future__ import annotations

from typing import Literal

from tbpw.contracts import EvalContext, NoOptions, PluginOptions
from tbpw.errors import TbpwError
from tbpw.hookspecs import hookimpl
from tbpw.llamacpp import parsers
from tbpw.llamacpp.tools import run_tool


def _common(ctx: EvalContext, n_ctx: int) -> list[str]:
    args = ["-m", str(ctx.model), "-c", str(n_ctx)]
    if ctx.ngl is not None:
        args += ["-ngl", str(ctx.ngl)]
    if ctx.threads:
        args += ["-t", str(ctx.threads)]
    return args


def _dataset(ctx: EvalContext, name: str, kind: str):
    ds = ctx.datasets.get(name)
    if ds is None:
        raise TbpwError(f"the {name} evaluator needs datasets.{name} in the recipe: add it or drop the evaluator")
    if ds.kind != kind:
        raise TbpwError(f"datasets.{name} gives a {ds.kind} file, the {name} evaluator reads {kind}: pick a {kind} dataset")
    return ds


class KlDivergence:
    name = "kld"
    description = "perplexity, KL divergence, ln-PPL correlation and same-top-p against the baseline's logits"
    Options = NoOptions

    def __init__(self, options: NoOptions):
        self.options = options

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        if ctx.base_logits is None:
            raise TbpwError("the kld evaluator needs the baseline logits: run the baseline stage first")
        args = [*_common(ctx, ctx.ctx), "--kl-divergence-base", str(ctx.base_logits), "--kl-divergence"]
        if ctx.chunks:
            args += ["--chunks", str(ctx.chunks)]
        run = run_tool("llama-perplexity", args, log_path=ctx.log_dir / "kld.log")
        r = parsers.parse_run(parsers.parse_kl_divergence, run)
        return {
            "ppl": r.ppl_q.value, "ppl_error": r.ppl_q.error, "ppl_base": r.ppl_base.value,
            "rho_ppl": r.ln_ppl_correlation_pct, "ln_ppl_ratio": r.ln_ppl_ratio.value,
            "kld_mean": r.kld.mean.value, "kld_mean_error": r.kld.mean.error, "kld_median": r.kld.median,
            "kld_p99": r.kld.percentiles.get(99.0, float("nan")), "kld_p99_9": r.kld.percentiles.get(99.9, float("nan")),
            "kld_max": r.kld.maximum, "same_top_p": r.same_top_p_pct.value, "same_top_p_error": r.same_top_p_pct.error,
            "rms_delta_p": r.rms_delta_p_pct.value,
        }


def _task_args(ctx: EvalContext, ds, mode: str, tasks: int) -> list[str]:
    """llama-perplexity arguments of one task mode ("hellaswag", "winogrande", "multiple-choice")."""
    data = ["-bf" if mode == "multiple-choice" else "-f", str(ds.path)]
    return [*_common(ctx, ctx.task_ctx), *data, f"--{mode}", f"--{mode}-tasks", str(tasks)]


class HellaSwag:
    name = "hellaswag"
    description = "HellaSwag acc_norm (llama-perplexity --hellaswag) on datasets.hellaswag"
    Options = NoOptions

    def __init__(self, options: NoOptions):
        self.options = options

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        args = _task_args(ctx, _dataset(ctx, "hellaswag", "hellaswag"), "hellaswag", ctx.tasks.get("hellaswag", 750))
        r = parsers.parse_run(parsers.parse_hellaswag, run_tool("llama-perplexity", args, log_path=ctx.log_dir / "hellaswag.log"))
        return {"hellaswag": r.acc_norm_pct, "hellaswag_tasks": float(r.tasks)}


class WinoGrande:
    name = "winogrande"
    description = "WinoGrande accuracy (llama-perplexity --winogrande) on datasets.winogrande"
    Options = NoOptions

    def __init__(self, options: NoOptions):
        self.options = options

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        args = _task_args(ctx, _dataset(ctx, "winogrande", "winogrande"), "winogrande", ctx.tasks.get("winogrande", 750))
        r = parsers.parse_run(parsers.parse_winogrande, run_tool("llama-perplexity", args, log_path=ctx.log_dir / "winogrande.log"))
        return {"winogrande": r.accuracy_pct, "winogrande_tasks": float(r.tasks)}


class MultipleChoiceOptions(PluginOptions):
    dataset: Literal["arc", "mmlu", "truthfulqa"]


class MultipleChoice:
    name = "multiple-choice"
    description = "multiple-choice accuracy (llama-perplexity --multiple-choice) on datasets.arc / mmlu / truthfulqa"
    Options = MultipleChoiceOptions

    def __init__(self, options: MultipleChoiceOptions):
        self.options = options

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        key = self.options.dataset
        tasks = ctx.tasks.get(key, ctx.tasks.get("multiple-choice", 750))
        args = _task_args(ctx, _dataset(ctx, key, "multiple-choice"), "multiple-choice", tasks)
        r = parsers.parse_run(parsers.parse_multiple_choice, run_tool("llama-perplexity", args, log_path=ctx.log_dir / f"{key}.log"))
        return {key: r.accuracy_pct, f"{key}_tasks": float(r.tasks)}


@hookimpl
def tbpw_register_evaluators(register):
    for cls in (KlDivergence, HellaSwag, WinoGrande, MultipleChoice):
        register(cls)
