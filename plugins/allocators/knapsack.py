"""Exact multiple-choice knapsack and the greedy fill it shares with the `greedy` allocator.

The knapsack is a dynamic program over byte buckets: `best[b]` is the least error of the tensors so
far that use exactly b buckets. With the gcd of every byte step as the bucket it is exact. When that
grid is too fine (big models), Lagrangian reduced-cost fixing first removes every candidate that
cannot be in an optimal mix (given a feasible mix and a dual bound), which usually leaves a problem
whose exact grid is small; only if it does not, buckets are widened (steps rounded up, still feasible)
and the leftover bytes are spent greedily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np
from pydantic import Field

from tbpw import AllocationProblem, Allocator, Candidate, PluginOptions, TbpwError

from .lagrangian import monotone


def _matrices(units: list[list[Candidate]]) -> tuple[np.ndarray, np.ndarray]:
    """Bytes and errors as [tensor, candidate] arrays, padded with +inf."""
    width = max(len(c) for c in units)
    nbytes = np.full((len(units), width), np.inf)
    errors = np.full((len(units), width), np.inf)
    for i, cands in enumerate(units):
        nbytes[i, :len(cands)] = [c.bytes for c in cands]
        errors[i, :len(cands)] = [c.error for c in cands]
    return nbytes, errors


def greedy_fill(units: list[list[Candidate]], choice: np.ndarray, remaining: int) -> np.ndarray:
    """Buy upgrades (to any larger candidate with less error) by most error saved per byte, while one
    fits in `remaining` bytes. Ties go to the first tensor, then the cheaper upgrade."""
    if not units:
        return choice
    nbytes, errors = _matrices(units)
    rows = np.arange(len(units))
    choice = choice.copy()
    left = float(remaining)
    with np.errstate(invalid="ignore"):
        while True:
            d_bytes = nbytes - nbytes[rows, choice][:, None]
            d_err = errors[rows, choice][:, None] - errors
            ok = (d_bytes > 0) & (d_err > 0) & (d_bytes <= left)
            if not ok.any():
                return choice
            ratio = np.where(ok, d_err / np.where(ok, d_bytes, 1.0), -np.inf)
            i, j = divmod(int(np.argmax(ratio)), ratio.shape[1])
            left -= d_bytes[i, j]
            choice[i] = j


@dataclass
class _Buckets:
    """The byte grid of one dynamic program: steps above each tensor's cheapest allowed candidate,
    counted in whole buckets of `unit` bytes (rounded up: always feasible; exact when `unit` divides
    every step)."""

    allowed: list[list[int]]
    deltas: list[list[int]]
    unit: int
    n_buckets: int
    capacity: int
    exact: bool


class Knapsack(Allocator):
    name = "knapsack"
    description = "exact multiple-choice knapsack over byte buckets: the least total error within the budget"
    default = True

    class Options(PluginOptions):
        max_buckets: int = Field(1 << 18, ge=1024, le=1 << 24,
                                 description="the most byte buckets one table may have (memory: tensors x buckets "
                                             "bytes); bigger problems are first reduced with a Lagrangian bound, and "
                                             "only solved approximately if still too big")
        window_bpw: float = Field(0.0, ge=0.0,
                                  description="if > 0, prefer the least-error mix that lands within this many bpw "
                                              "under the target (when one exists) over the unconstrained optimum, "
                                              "which may leave more of the budget unspent")

    def __init__(self, options: Knapsack.Options):
        super().__init__(options)
        self.exact: bool | None = None  # after allocate(): is the answer the proven optimum?

    def allocate(self, problem: AllocationProblem) -> dict[str, str]:
        window = int(self.options.window_bpw * problem.n_elements / 8.0)
        if window:
            # a dominated candidate never lowers the optimum, but its bytes may be what lands in the window
            units = [sorted(u.candidates, key=lambda c: (c.bytes, c.error)) for u in problem.tensors]
        else:
            units = [monotone(u.candidates) for u in problem.tensors]
        budget = problem.budget
        if sum(c[0].bytes for c in units) > budget:
            raise TbpwError("knapsack: the budget is under the cheapest mix: raise the target")
        grid = self._grid(units, [list(range(len(c))) for c in units], budget)
        if not grid.exact and not window:
            # Lagrangian reduced-cost fixing: with a feasible mix of error `upper` and a dual bound `lower`,
            # a candidate whose reduced cost exceeds upper - lower is in no optimal mix. What is left
            # usually spans few bytes, so its grid is exact again.
            incumbent = greedy_fill(units, np.zeros(len(units), dtype=np.int64), budget - sum(c[0].bytes for c in units))
            grid = self._grid(units, _reduce(units, budget, _error(units, incumbent)), budget)
        choice = self._solve(units, grid, window)
        self.exact = grid.exact
        if not grid.exact:
            choice = greedy_fill(units, choice, budget - sum(c[int(j)].bytes for c, j in zip(units, choice)))
            if not window:
                choice = min((choice, incumbent), key=lambda ch: _error(units, ch))
        return {u.name: cands[int(j)].type for u, cands, j in zip(problem.tensors, units, choice)}

    def _grid(self, units: list[list[Candidate]], allowed: list[list[int]], budget: int) -> _Buckets:
        base = sum(units[i][a[0]].bytes for i, a in enumerate(allowed))
        capacity = budget - base
        deltas = [[units[i][j].bytes - units[i][a[0]].bytes for j in a] for i, a in enumerate(allowed)]
        steps = [d for ds in deltas for d in ds if 0 < d <= capacity]
        unit = reduce(math.gcd, steps) if steps else 1
        exact = capacity // unit + 1 <= self.options.max_buckets
        if not exact:
            unit = -(-capacity // (self.options.max_buckets - 1))
        return _Buckets(allowed, deltas, unit, capacity // unit + 1, capacity, exact)

    @staticmethod
    def _solve(units: list[list[Candidate]], grid: _Buckets, window: int) -> np.ndarray:
        # best[b] = least error of the tensors so far using exactly b buckets (inf: no such mix)
        n_buckets, unit = grid.n_buckets, grid.unit
        best = np.full(n_buckets, np.inf)
        best[0] = 0.0
        picks = np.zeros((len(units), n_buckets), dtype=np.uint8)
        for i, (allowed, ds) in enumerate(zip(grid.allowed, grid.deltas)):
            errs = [units[i][j].error for j in allowed]
            new = best + errs[0]
            pick = picks[i]
            for k in range(1, len(ds)):
                w = -(-ds[k] // unit)
                if w >= n_buckets:
                    break
                trial = best[:n_buckets - w] + errs[k]
                better = trial < new[w:]
                new[w:][better] = trial[better]
                pick[w:][better] = k
            best = new
        b = _last_argmin(best)
        start = max(0, -(-(grid.capacity - window) // unit)) if window else None
        if start is not None and np.isfinite(best[start:]).any():
            b = start + _last_argmin(best[start:])
        choice = np.zeros(len(units), dtype=np.int64)
        for i in range(len(units) - 1, -1, -1):
            k = int(picks[i, b])
            choice[i] = grid.allowed[i][k]
            b -= -(-grid.deltas[i][k] // unit)
        return choice


def _error(units: list[list[Candidate]], choice: np.ndarray) -> float:
    return float(sum(c[int(j)].error for c, j in zip(units, choice)))


def _reduce(units: list[list[Candidate]], budget: int, upper: float) -> list[list[int]]:
    """Per tensor, the candidates that can still be in an optimal mix, given a feasible mix of error
    `upper`. For any multiplier lam >= 0 and any feasible mix x:
    error(x) >= lower(lam) + sum_i r_i(x_i), with lower(lam) = sum_i min_j (e_ij + lam b_ij) - lam B and
    r_ij = e_ij + lam b_ij - min_k (e_ik + lam b_ik); so r_ij > upper - lower rules candidate j out."""
    nbytes, errors = _matrices(units)
    finite = np.isfinite(nbytes)

    def at(lam: float) -> tuple[float, float, np.ndarray]:
        cost = np.where(finite, errors + lam * np.where(finite, nbytes, 0.0), np.inf)
        low = cost.min(axis=1)
        used = np.take_along_axis(np.where(finite, nbytes, 0.0), cost.argmin(axis=1)[:, None], axis=1).sum()
        return float(low.sum() - lam * budget), float(used), cost - low[:, None]

    lo, hi = 0.0, 1.0
    for _ in range(200):
        if at(hi)[1] <= budget:
            break
        lo, hi = hi, hi * 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if at(mid)[1] > budget:
            lo = mid
        else:
            hi = mid
    lower, _, reduced = max((at(lo), at(hi)), key=lambda r: r[0])
    slack = upper - lower + 1e-9 * (abs(upper) + 1.0)
    return [[j for j in range(len(c)) if reduced[i, j] <= slack] for i, c in enumerate(units)]


def _last_argmin(values: np.ndarray) -> int:
    """Index of the minimum; among equal minima the last (the mix closest to the budget)."""
    return len(values) - 1 - int(np.argmin(values[::-1]))
