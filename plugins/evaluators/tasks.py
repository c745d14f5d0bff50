"""Task accuracies with llama-perplexity's task modes: HellaSwag, WinoGrande, multiple choice (ARC, MMLU,
TruthfulQA). Each reads the recipe dataset of its role and reports a percentage (higher is better) with its
standard error: the tool's own where it prints one (WinoGrande and multiple choice from 100 tasks on), else the
same binomial formula llama-perplexity uses for those, 100 * sqrt(p (1 - p) / (n - 1))."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from tbpw import Column, DatasetKind, EvalContext, Evaluator, PluginOptions

TITLES = {"hellaswag": "HellaSwag", "winogrande": "WinoGrande", "arc": "ARC", "mmlu": "MMLU",
          "truthfulqa": "TruthfulQA"}


class TaskOptions(PluginOptions):
    tasks: int = Field(750, ge=1, description="how many tasks of the file to score")


def _task_columns(key: str) -> tuple[Column, ...]:
    title = TITLES.get(key, key)
    return (Column(key, title, lower_is_better=False, table="tasks", digits=2, error_key=f"{key}_error"),
            Column(f"{key}_error", f"{title} ±", table="none", digits=2),
            Column(f"{key}_tasks", f"{title} tasks", table="none", digits=0))


def standard_error(accuracy_pct: float, tasks: int) -> float:
    """The standard error of an accuracy over `tasks` tasks, in percent, as llama-perplexity computes it."""
    if tasks < 2:
        return float("nan")
    p = accuracy_pct / 100
    return 100 * math.sqrt(max(p * (1 - p), 0.0) / (tasks - 1))


def _score(key: str, accuracy_pct: float, error_pct: float | None, tasks: int) -> dict[str, float]:
    error = error_pct if error_pct is not None else standard_error(accuracy_pct, tasks)
    return {key: accuracy_pct, f"{key}_error": error, f"{key}_tasks": float(tasks)}


class HellaSwag(Evaluator):
    name = "hellaswag"
    description = "HellaSwag acc_norm (llama-perplexity --hellaswag) on datasets.hellaswag"
    Options = TaskOptions
    columns = _task_columns("hellaswag")

    def dataset_roles(self) -> dict[str, DatasetKind]:
        return {"hellaswag": "hellaswag"}

    def evaluate(self, context: EvalContext) -> dict[str, float]:
        r = context.task("hellaswag", "hellaswag", self.options.tasks)
        return _score("hellaswag", r.acc_norm_pct, None, r.tasks)


class WinoGrande(Evaluator):
    name = "winogrande"
    description = "WinoGrande accuracy (llama-perplexity --winogrande) on datasets.winogrande"
    Options = TaskOptions
    columns = _task_columns("winogrande")

    def dataset_roles(self) -> dict[str, DatasetKind]:
        return {"winogrande": "winogrande"}

    def evaluate(self, context: EvalContext) -> dict[str, float]:
        r = context.task("winogrande", "winogrande", self.options.tasks)
        return _score("winogrande", r.accuracy_pct, r.error_pct, r.tasks)


class MultipleChoiceOptions(TaskOptions):
    dataset: Literal["arc", "mmlu", "truthfulqa"] = Field(description="the recipe dataset role to score")


class MultipleChoice(Evaluator):
    name = "multiple-choice"
    description = "multiple-choice accuracy (llama-perplexity --multiple-choice) on datasets.arc / mmlu / truthfulqa"
    Options = MultipleChoiceOptions

    def output_columns(self) -> tuple[Column, ...]:
        return _task_columns(self.options.dataset)

    def dataset_roles(self) -> dict[str, DatasetKind]:
        return {self.options.dataset: "multiple-choice"}

    def evaluate(self, context: EvalContext) -> dict[str, float]:
        key = self.options.dataset
        r = context.task("multiple-choice", key, self.options.tasks)
        return _score(key, r.accuracy_pct, r.error_pct, r.tasks)
