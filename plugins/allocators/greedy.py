"""greedy: from the cheapest mix, buy the upgrade with the most error saved per byte until the budget is spent."""

from __future__ import annotations

import numpy as np

from tbpw import AllocationProblem, Allocator

from .knapsack import greedy_fill
from .lagrangian import monotone


class Greedy(Allocator):
    name = "greedy"
    description = "from the cheapest mix, buy the upgrade with the most error saved per byte until the budget is spent"

    def allocate(self, problem: AllocationProblem) -> dict[str, str]:
        units = [monotone(u.candidates) for u in problem.tensors]
        start = np.zeros(len(units), dtype=np.int64)
        choice = greedy_fill(units, start, problem.budget - sum(c[0].bytes for c in units))
        return {u.name: cands[int(j)].type for u, cands, j in zip(problem.tensors, units, choice)}
