"""The target-bpw fork's solver, rule for rule (read from EAddario/llama.cpp `quantize`, llama.cpp
PRs #14891 and #15550; our own code).

1. per tensor: candidates by bytes with strictly decreasing error, then their lower convex hull;
2. boosts (options, the fork's values by default): dense ffn_down x6 (at or above 2.2 bpw; below it its
   errors are weighted by 1 + 2^(3 - bpw) instead), output.weight x3, attn_v x1.25, a tied token_embd
   x2.5 (less when it is over 10% of the weights); a boost divides the tensor's price per bit;
3. Lagrange multiplier by doubling then 40 bisection steps, keeping the closest under-budget result;
4. one greedy pass over the remainder, best boosted error saved per byte first;
5. caps: dense ffn_down more than 2 bpw under their median are raised (8+ layers, at or above the taper);
   ffn_down_exps are kept at or under the gate/up expert mean (below the taper); then 3-4 again.
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass

from pydantic import Field

from tbpw import (
    FORK_TYPES,
    AllocationProblem,
    Allocator,
    Candidate,
    DecidableTensor,
    PluginOptions,
    fork_pareto,
    nominal_bpw,
)

_EPS = 1e-12
# The quantized types of the fork's list, in its order: the dense ffn_down cap picks its fill type here.
_QUANT_TYPES = tuple(t for t in FORK_TYPES if t not in ("F16", "BF16"))
_K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_DENSE_DOWN = re.compile(r"blk\.[0-9]+\.ffn_down\.weight")
_EXPERT_DOWN = re.compile(r"blk\.[0-9]+\.ffn_down_exps\.weight")
_EXPERT_GATE = re.compile(r"blk\.[0-9]+\.ffn_gate_exps\.weight")
_EXPERT_UP = re.compile(r"blk\.[0-9]+\.ffn_up_exps\.weight")


@dataclass
class _Choice:
    """One candidate during solving; the error may be re-weighted by the low-bpw ffn_down rule."""

    type: str
    bytes: int
    error: float
    bpw: float


@dataclass(eq=False)
class _Item:
    unit: DecidableTensor
    cands: list[_Choice]
    boost: float = 1.0
    choice: int = 0

    @property
    def chosen(self) -> _Choice:
        return self.cands[self.choice]


def monotone(candidates) -> list[Candidate]:
    """Sorted by bytes, keeping only candidates whose error is below every cheaper one's: the others
    are never worth their bytes, to any allocator."""
    return fork_pareto(candidates, convex=False)


def lower_hull(candidates) -> list[Candidate]:
    """The fork's simplification: the monotone frontier, then its lower convex hull of (bytes, error)."""
    return fork_pareto(candidates, convex=True)


def _relax(items: list[_Item], mu: float) -> tuple[list[int], int]:
    """Each tensor's best candidate for error + (mu / boost) * bits, in the fork's comparison order."""
    choices, total = [], 0
    for it in items:
        eff = mu / it.boost
        best = 0
        for j in range(1, len(it.cands)):
            cj, cb = it.cands[j], it.cands[best]
            lr = (cj.error - cb.error) + eff * (float(cj.bytes) - float(cb.bytes)) * 8.0
            if lr < -_EPS or (abs(lr) <= _EPS and cj.bytes < cb.bytes):
                best = j
        choices.append(best)
        total += it.cands[best].bytes
    return choices, total


def _auction(items: list[_Item], budget: int, steps: int) -> None:
    """Lagrange multiplier by doubling then bisection, closest under-budget result, then a single
    greedy pass that spends the remainder on the best boosted error saved per byte."""
    if not items:
        return
    lo_total = sum(it.cands[0].bytes for it in items)
    hi_total = sum(it.cands[-1].bytes for it in items)
    if budget <= lo_total:
        for it in items:
            it.choice = 0
        return
    if budget >= hi_total:
        for it in items:
            it.choice = len(it.cands) - 1
        return
    mu_lo, mu_hi = 0.0, 1.0
    ch_hi: list[int] = []
    bt_hi = 0
    for _ in range(60):
        ch_hi, bt_hi = _relax(items, mu_hi)
        if bt_hi <= budget:
            break
        mu_hi *= 2.0
    gap_under = gap_over = math.inf
    ch_under: list[int] | None = None
    ch_over: list[int] | None = None
    for _ in range(steps):
        mu = 0.5 * (mu_lo + mu_hi)
        ch, bt = _relax(items, mu)
        gap = abs(float(bt) - float(budget))
        if bt > budget:
            mu_lo = mu
            if gap < gap_over:
                gap_over, ch_over = gap, ch
        else:
            mu_hi = mu
            if gap < gap_under:
                gap_under, ch_under = gap, ch
    picked = ch_under or ch_over or (ch_hi if bt_hi <= budget else [0] * len(items))
    for it, c in zip(items, picked):
        it.choice = c

    spent = sum(it.chosen.bytes for it in items)
    queue: list[tuple[float, int, int]] = []

    def push_next(i: int) -> None:
        it = items[i]
        nxt = it.choice + 1
        if nxt < len(it.cands):
            d_err = max(0.0, it.cands[it.choice].error - it.cands[nxt].error)
            d_bytes = float(it.cands[nxt].bytes - it.cands[it.choice].bytes)
            if d_bytes > _EPS:
                heapq.heappush(queue, (-(d_err / d_bytes) * it.boost, i, nxt))

    for i in range(len(items)):
        push_next(i)
    while queue:
        _, i, nxt = heapq.heappop(queue)
        it = items[i]
        if it.choice >= nxt:
            continue
        delta = it.cands[nxt].bytes - it.cands[it.choice].bytes
        if spent + delta <= budget:
            spent += delta
            it.choice = nxt
            push_next(i)


class Lagrangian(Allocator):
    name = "lagrangian"
    description = "the target-bpw fork's solver: convex hull, Lagrange multiplier, greedy fill, its boosts and caps"

    class Options(PluginOptions):
        fork_rules: bool = Field(True, description="apply the boosts and caps below (False: the plain solver)")
        ffn_down_boost: float = Field(6.0, gt=0, description="priority of dense ffn_down at or above boost_taper_bpw")
        output_boost: float = Field(3.0, gt=0, description="priority of output.weight")
        attn_v_boost: float = Field(1.25, gt=0, description="priority of attn_v tensors")
        tied_embd_boost: float = Field(2.5, gt=0, description="priority of a tied token_embd (less when it is over 10% of the weights)")
        boost_taper_bpw: float = Field(2.2, description="below this budget bpw the boosts give way to the rules for low bpw")
        low_bpw_ffn_down_penalty: bool = Field(True, description="below the taper, weight dense ffn_down errors by 1 + 2^(3 - bpw)")
        dense_ffn_down_cap: bool = Field(True, description="at or above the taper, raise dense ffn_down more than 2 bpw under their median (8+ layers)")
        expert_down_cap: bool = Field(True, description="below the taper, cap ffn_down_exps at the larger of the gate/up expert means")
        bisection_steps: int = Field(40, ge=1, le=200, description="bisection steps for the Lagrange multiplier")


    def boosts(self, problem: AllocationProblem) -> dict[str, float]:
        """Each tensor's boost (> 1: favoured), as the fork's mix marks them with an arrow."""
        items = self._items(problem)
        self._apply_rules(problem, items)
        return {it.unit.name: it.boost for it in items}

    def _items(self, problem: AllocationProblem) -> list[_Item]:
        return [_Item(u, [_Choice(c.type, c.bytes, c.error, c.bpw) for c in lower_hull(list(u.candidates))])
                for u in problem.tensors]

    def _global_bpw(self, problem: AllocationProblem) -> float:
        elements = sum(u.n_elements for u in problem.tensors)
        return 8.0 * problem.budget / elements if elements else 0.0

    @staticmethod
    def _inside(problem: AllocationProblem, items: list[_Item]) -> bool:
        # the fork decides boosts and caps only when the budget lies strictly inside the hulls' range
        return sum(it.cands[0].bytes for it in items) < problem.budget < sum(it.cands[-1].bytes for it in items)

    def _apply_rules(self, problem: AllocationProblem, items: list[_Item]) -> None:
        o = self.options
        if not o.fork_rules or not self._inside(problem, items):
            return
        global_bpw = self._global_bpw(problem)
        total = sum(it.unit.n_elements for it in items)
        for it in items:
            name = it.unit.name
            if "ffn_down.weight" in name:
                if global_bpw < o.boost_taper_bpw:
                    if o.low_bpw_ffn_down_penalty:
                        for c in it.cands:
                            c.error *= 1.0 + 2.0 ** (3.0 - c.bpw)
                else:
                    it.boost = o.ffn_down_boost
            elif name == "output.weight":
                it.boost = o.output_boost
            elif "attn_v" in name:
                it.boost = o.attn_v_boost
            elif problem.tied_embeddings and name == "token_embd.weight" and global_bpw >= o.boost_taper_bpw:
                share = it.unit.n_elements / total
                it.boost = o.tied_embd_boost if share <= 0.10 else max(1.25, o.tied_embd_boost * (1.0 - 3.0 * (share - 0.10)))

    def allocate(self, problem: AllocationProblem) -> dict[str, str]:
        o = self.options
        items = self._items(problem)
        inside = self._inside(problem, items)
        self._apply_rules(problem, items)
        steps = o.bisection_steps
        _auction(items, problem.budget, steps)
        if o.fork_rules and inside:
            global_bpw = self._global_bpw(problem)
            if global_bpw >= o.boost_taper_bpw and o.dense_ffn_down_cap:
                _dense_down_cap(items, problem.budget, steps)
            if global_bpw < o.boost_taper_bpw and o.expert_down_cap:
                _expert_down_cap(items, problem.budget, steps)
        return {it.unit.name: it.chosen.type for it in items}


def _locked_budget(budget: int, locked: int) -> int:
    return budget - locked if budget > locked else 0


def _dense_down_cap(items: list[_Item], budget: int, steps: int) -> None:
    """Raise dense ffn_down tensors that ended more than 2 bpw under the median of their role to the
    cheapest type at or above the median, lock them, and solve the rest again."""
    role = [it for it in items if _DENSE_DOWN.fullmatch(it.unit.name)]
    if len(role) < 8:
        return
    values = sorted(it.chosen.bpw for it in role)
    mid = len(values) // 2
    median = values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])
    outliers = [it for it in role if median - it.chosen.bpw > 2.0]
    if not outliers:
        return
    fill, fill_bpw, fill_rank = "Q8_0", math.inf, 3
    for t in _QUANT_TYPES:
        nominal = nominal_bpw(t)
        if nominal < median:
            continue
        rank = 0 if t in _K_TYPES else 1 if t.startswith("IQ") else 2
        if nominal < fill_bpw or (nominal == fill_bpw and rank < fill_rank):
            fill, fill_bpw, fill_rank = t, nominal, rank
    locked = 0
    for it in outliers:
        t = it.unit.effective_type(fill)
        idx = next((j for j, c in enumerate(it.cands) if c.type == t), -1)
        if idx < 0:
            # not a measured candidate: the fork takes it anyway, with an unknown error
            it.cands.append(_Choice(t, it.unit.bytes_as(t), math.nan, 8.0 * it.unit.data_bytes(t) / it.unit.n_elements))
            idx = len(it.cands) - 1
        it.choice = idx
        locked += it.chosen.bytes
    rest = [it for it in items if it not in outliers]
    _auction(rest, _locked_budget(budget, locked), steps)


def _expert_down_cap(items: list[_Item], budget: int, steps: int) -> None:
    """At low bpw, keep each ffn_down_exps at or under the larger of the gate/up expert means: lock the
    gate/up experts where they are, cap the down experts, and solve the rest again."""

    def mean_bpw(pattern: re.Pattern[str]) -> tuple[float, list[_Item]]:
        members = [it for it in items if pattern.fullmatch(it.unit.name)]
        weight = sum(it.unit.n_elements for it in members)
        return (sum(it.unit.n_elements * it.chosen.bpw for it in members) / weight if weight else -1.0), members

    down_bpw, role = mean_bpw(_EXPERT_DOWN)
    gate_bpw, gates = mean_bpw(_EXPERT_GATE)
    up_bpw, ups = mean_bpw(_EXPERT_UP)
    sibling_bpw = max(gate_bpw, up_bpw)
    if not role or sibling_bpw <= 0.0 or down_bpw <= sibling_bpw:
        return
    outliers = [it for it in role if it.chosen.bpw > sibling_bpw]
    if not outliers:
        return
    siblings = {id(it) for it in gates + ups}
    role_ids = {id(it) for it in role}
    locked, remaining = 0, []
    for it in items:
        if it not in outliers:
            if id(it) in siblings:
                locked += it.chosen.bytes
                continue
            if id(it) in role_ids:
                chosen = it.chosen.type
                kept = [c for c in it.cands if c.bpw <= sibling_bpw]
                idx = next((j for j, c in enumerate(kept) if c.type == chosen), -1)
                if idx >= 0:
                    it.cands, it.choice = kept, idx
            remaining.append(it)
            continue
        idx = -1
        for j, c in enumerate(it.cands):
            if c.bpw <= sibling_bpw and (idx < 0 or c.bpw > it.cands[idx].bpw):
                idx = j
        if idx < 0:
            remaining.append(it)
            continue
        it.choice = idx
        locked += it.chosen.bytes
    _auction(remaining, _locked_budget(budget, locked), steps)
