"""The evaluation's options (a recipe's `evaluation:`): the text the baseline's logits and every quant's numbers
are measured on, and which quants the task benchmarks run on."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tbpw.options import TOOL_INT, Strict


class EvaluationOptions(Strict):
    ctx: int = Field(512, ge=32, le=TOOL_INT)
    chunks: int | None = Field(None, ge=1, le=TOOL_INT)
    task_ctx: int = Field(768, ge=32, le=TOOL_INT)  # context for HellaSwag/WinoGrande/multiple choice
    threads: int | None = Field(None, ge=1, le=TOOL_INT)
    # which quants the evaluators that `select.by` does not rank by (the task benchmarks) and llama-bench run on:
    # all, or selected: each target's selected quant, the stock types and compare_files (the rest get only the
    # evaluators that select, which is all the selection needs)
    scope: Literal["all", "selected"] = "all"
