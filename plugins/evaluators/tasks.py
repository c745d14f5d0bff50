"""Task accuracies with llama-perplexity's task modes: HellaSwag, WinoGrande, multiple choice (ARC, MMLU,
TruthfulQA). Each reads the recipe dataset of its role and reports a percentage (higher is better)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tbpw import Column, DatasetKind, EvalContext, Evaluator, PluginOptions

TITLES = {"hellaswag": "HellaSwag", "winogrande": "WinoGrande", "arc": "ARC", "mmlu": "MMLU",
          "truthfulqa": "TruthfulQA"}


class TaskOptions(PluginOptions):
    tasks: int = Field(750, ge=1, description="how many tasks of the file to score")


def _task_columns(key: str) -> tuple[Column, ...]:
    return (Column(key, TITLES.get(key, key), lower_is_better=False, table="tasks", digits=2),
            Column(f"{key}_tasks", f"{TITLES.get(key, key)} tasks", table="none", digits=0))


class HellaSwag(Evaluator):
    name = "hellaswag"
    description = "HellaSwag acc_norm (llama-perplexity --hellaswag) on datasets.hellaswag"
    Options = TaskOptions
    columns = _task_columns("hellaswag")

    def dataset_roles(self) -> dict[str, DatasetKind]:
        return {"hellaswag": "hellaswag"}

    def evaluate(self, context: EvalContext) -> dict[str, float]:
        r = context.task("hellaswag", "hellaswag", self.options.tasks)
        return {"hellaswag": r.acc_norm_pct, "hellaswag_tasks": float(r.tasks)}


class WinoGrande(Evaluator):
    name = "winogrande"
    description = "WinoGrande accuracy (llama-perplexity --winogrande) on datasets.winogrande"
    Options = TaskOptions
    columns = _task_columns("winogrande")

    def dataset_roles(self) -> dict[str, DatasetKind]:
        return {"winogrande": "winogrande"}

    def evaluate(self, context: EvalContext) -> dict[str, float]:
        r = context.task("winogrande", "winogrande", self.options.tasks)
        return {"winogrande": r.accuracy_pct, "winogrande_tasks": float(r.tasks)}


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
        return {key: r.accuracy_pct, f"{key}_tasks": float(r.tasks)}
