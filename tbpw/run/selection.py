"""The selection policy, in one place: which of a target's quants is its best (the report's ★, the one
`evaluation.scope: selected` evaluates further, the one `keep: chosen` keeps).

A recipe's `select.by` names evaluator columns, most important first; each ranks in its better direction as its
evaluator declares (`Column.lower_is_better`). A missing value ranks last; ties go to the first quant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import Field

from tbpw.options import Strict
from tbpw.plugin.base import Column


class SelectOptions(Strict):
    """How the best quant of each target is picked: evaluator columns, most important first (a column that
    ranks quants; lower or higher is better as its evaluator declares). Empty: the first evaluator's ranking."""

    by: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class SelectionRule:
    by: tuple[str, ...]
    lower_is_better: Mapping[str, bool] = field(default_factory=dict)  # rankable column -> its direction

    @classmethod
    def of(cls, by: Sequence[str], columns: Sequence[Column]) -> SelectionRule:
        return cls(tuple(by), {c.key: bool(c.lower_is_better) for c in columns if c.rankable})

    def best(self, metrics: Mapping[str, Mapping[str, float]]) -> str:
        """The name whose metrics rank best."""

        def key(name: str) -> tuple:
            values = []
            for column in self.by:
                v = metrics[name].get(column)
                values.append(float("inf") if v is None else (v if self.lower_is_better[column] else -v))
            return tuple(values)

        return min(metrics, key=key)

    def is_best(self, name: str, rivals: Mapping[str, Mapping[str, float]]) -> bool:
        return self.best(rivals) == name


def evaluator_columns(evaluators: Sequence) -> list[Column]:
    """Every column the evaluators (plugin instances) report, in their order, each once: the report's columns."""
    seen: dict[str, Column] = {}
    for evaluator in evaluators:
        for column in evaluator.output_columns():
            seen.setdefault(column.key, column)
    return list(seen.values())
