"""Measured refinement: improve a plan by type swaps that real KL divergence on CALIBRATION text confirms.

The allocator's plan is optimal for its error table, but the table is an estimate. Moves whose estimated
cost is smallest (one tensor a step up, another a step down, within the budget) are the ones the estimate
is least sure about: each round writes the `tries` cheapest-looking swaps, scores them against the float
model on calibration chunks, and keeps the best if it beats the current plan (exllamav3's measured
per-module swaps, on tbpw's exact byte budget).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tbpw.allocate.plan import Plan, make_plan
from tbpw.allocate.problem import AllocationProblem, Candidate, DecidableTensor
from tbpw.allocate.service import Planner
from tbpw.llamacpp.perplexity import KldScore
from tbpw.select.options import ChooseOptions
from tbpw.select.scoring import Scorer


@dataclass
class Refinement:
    plan: Plan
    score: KldScore
    start: KldScore
    accepted: list[str] = field(default_factory=list)  # "up A, down B" per accepted round
    evaluated: int = 0
    seconds: float = 0.0


def _up(unit: DecidableTensor, current: Candidate) -> Candidate | None:
    better = [c for c in unit.candidates if c.bytes > current.bytes and c.error < current.error]
    return min(better, key=lambda c: (c.bytes, c.error)) if better else None


def _down(unit: DecidableTensor, current: Candidate) -> Candidate | None:
    cheaper = [c for c in unit.candidates if c.bytes < current.bytes]
    return min(cheaper, key=lambda c: (c.error, -c.bytes)) if cheaper else None


# A swap that frees more than it spends leaves bytes unused; the plan may end at most this far under its target
# (or as far as it started, when that is more), so that refining never trades away the size the user asked for.
MAX_SHORTFALL_BPW = 0.005


def swap_moves(problem: AllocationProblem, choice: dict[str, str],
               min_bytes: int = 0) -> list[tuple[float, str, str, str, str]]:
    """(estimated error change, up tensor, its new type, down tensor, its new type), cheapest first; only swaps
    that keep the plan's bytes within [min_bytes, budget]."""
    used = problem.total_bytes(choice)
    ups, downs = [], []
    for unit in problem.tensors:
        current = unit.candidate(choice[unit.name])
        if current is None:
            continue
        if (u := _up(unit, current)) is not None:
            ups.append((unit.name, u, u.bytes - current.bytes, u.error - current.error))
        if (d := _down(unit, current)) is not None:
            downs.append((unit.name, d, current.bytes - d.bytes, d.error - current.error))
    moves = []
    for a, ua, extra, gain in ups:
        for b, db, freed, loss in downs:
            if a != b and min_bytes <= used + extra - freed <= problem.budget:
                moves.append((gain + loss, a, ua.type, b, db.type))
    moves.sort()
    return moves


def refine_plan(planner: Planner, problem: AllocationProblem, plan: Plan, calibration_text: Path | str,
                work_dir: Path | str, options: ChooseOptions, *, ngl: int | None = None,
                start_score: KldScore | None = None, scorer: Scorer | None = None,
                log: Callable[[str], None] | None = None) -> Refinement:
    """Up to `options.refine_rounds` rounds of `options.refine_tries` measured swaps each, starting from `plan`
    (see the module doc), scored on `options.chunks` x `options.ctx` tokens of calibration text.

    `start_score` is `plan`'s score on the same calibration chunks, when the caller has it (select_plan's);
    `scorer` keeps the float logits and every score (a swap already scored is not scored again)."""
    ctx, chunks, rounds, tries = options.ctx, options.chunks, options.refine_rounds, options.refine_tries
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    say = log or (lambda line: None)
    scorer = scorer or Scorer(planner.model, calibration_text, imatrix=planner.imatrix, ctx=ctx, chunks=chunks,
                              threads=planner.threads, ngl=ngl, cache_dir=work / "scores", log=say)
    seconds = 0.0
    evaluated = 0

    def score_of(candidate: Plan, name: str) -> KldScore:
        nonlocal seconds, evaluated
        types = candidate.types()
        found = scorer.lookup(types, chunks)
        if found is None:
            out = work / f"{name}.gguf"
            applied = planner.write(candidate, out, log_path=work / f"{name}.quantize.log")
            found = scorer.score(out, types, chunks, log_path=work / f"{name}.kld.log")
            out.unlink()
            seconds += applied.seconds + found.seconds
        evaluated += 1
        return found

    types = plan.types()
    choice = {u.name: types[u.members[0].name] for u in problem.tensors}
    current, current_score = plan, start_score or score_of(plan, "refine-start")
    start, accepted = current_score, []
    shortfall = int(MAX_SHORTFALL_BPW * problem.n_elements / 8)
    min_bytes = min(problem.total_bytes(choice), problem.budget - shortfall)
    for r in range(rounds):
        moves = swap_moves(problem, choice, min_bytes)[:tries]
        best = None
        for i, (_, a, ta, b, tb) in enumerate(moves):
            trial = dict(choice, **{a: ta, b: tb})
            refined = f"{plan.allocator}+refined"
            cand = make_plan(planner.inventory, problem, trial, allocator=refined, options=plan.allocator_options,
                             metadata_bytes=planner.metadata_bytes(problem.target, refined, plan.allocator_options))
            s = score_of(cand, f"refine-{r}-{i}")
            say(f"  round {r}: {a} -> {ta}, {b} -> {tb}: calibration KLD {s.kld_mean:.6f} "
                f"(now {current_score.kld_mean:.6f})")
            if s.kld_mean < current_score.kld_mean and (best is None or s.kld_mean < best[0].kld_mean):
                best = (s, cand, trial, f"{a} -> {ta}, {b} -> {tb}")
        if best is None:
            break
        current_score, current, choice = best[0], best[1], best[2]
        accepted.append(best[3])
    return Refinement(current, current_score, start, accepted, evaluated, seconds)
