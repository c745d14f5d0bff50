"""End-to-end choice among candidate plans by KL divergence on CALIBRATION text.

Per-tensor errors do not add up exactly (docs/results/quality.md), so tbpw makes
several plans for one target (allocators, metrics, calibrated tables), writes each, and keeps the one whose
output is closest to the float model on calibration text. `select_plan` is given the calibration file and
nothing else: it cannot see the text the reported numbers are measured on.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tbpw.allocate.plan import Plan
from tbpw.allocate.problem import AllocatorPlugin, ErrorTableLike
from tbpw.allocate.service import Planner
from tbpw.errors import TbpwError
from tbpw.files.atomic import atomic_path
from tbpw.llamacpp.perplexity import BaseLogits, KldScore
from tbpw.model.budget import Target
from tbpw.select.options import ChooseOptions
from tbpw.select.scoring import Scorer
from tbpw.select.scoring import finalists as scoring_finalists


@dataclass(frozen=True)
class PlanCandidate:
    name: str
    plan: Plan


@dataclass
class Selection:
    best: str
    plan: Plan
    path: Path  # the best candidate's quantized GGUF (kept in work_dir)
    # candidate -> the score the choice was made on: on the chunks of the last round, for the plans scored in it
    # (when a round left one plan, that round's plans: scoring a lone survivor further would change nothing)
    scores: dict[str, KldScore]
    duplicates: dict[str, str] = field(default_factory=dict)  # candidate -> the earlier one with the same types
    base: BaseLogits | None = None
    seconds: float = 0.0
    screening: dict[str, KldScore] = field(default_factory=dict)  # candidate -> its score on the first round
    runs: int = 0  # KLD runs made (scores kept from earlier runs cost none)
    chunks: int = 0  # the chunks `scores` are on (the first ones of the text)

    def to_json(self) -> dict:
        return {"best": self.best, "path": str(self.path), "scores": {k: v.to_json() for k, v in self.scores.items()},
                "screening": {k: v.to_json() for k, v in self.screening.items()},
                "duplicates": self.duplicates, "seconds": round(self.seconds, 3), "kld_runs": self.runs,
                "chunks": self.chunks,
                "calibration": {"text": str(self.base.text), "ctx": self.base.ctx, "chunks": self.base.chunks}
                if self.base else None}


def select_plan(candidates: Sequence[PlanCandidate], planner: Planner, calibration_text: Path | str,
                work_dir: Path | str, options: ChooseOptions, *, ngl: int | None = None, keep: bool = False,
                written: Mapping[str, Path] | None = None,
                scorer: Scorer | None = None, log: Callable[[str], None] | None = None) -> Selection:
    """Write the candidate plans, score them against the float model on `options.chunks` x `options.ctx` tokens
    of `calibration_text`, and return the lowest mean KL divergence (ties: the earlier candidate).

    Candidates with the same type map are scored once (and, through `scorer`'s kept scores, once across targets
    and runs). With `options.screen_chunks` (fewer than `chunks`), plans are scored in rounds of that many chunks,
    each chunk once: every distinct plan on the first round, and after each round only the leader and the plans
    statistically tied with it on all the chunks so far (`scoring.finalists`, at most `options.finalists`) go on
    to the next; with `options.margin`, only those that may still beat the leader by more than that part of its
    KLD. The choice ends when one plan is left (it is not scored further) or when the survivors have been
    scored on all `chunks`. `written` maps candidate names to GGUFs already written from their plans (they are
    scored as they are, not written again). The winner's GGUF stays (in `work_dir`, or where `written` had it);
    the ones written here are deleted unless `keep`.
    """
    if not candidates:
        raise TbpwError("select_plan needs at least one candidate plan")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise TbpwError("candidate plan names must be unique")
    ctx, chunks, screen_chunks = options.ctx, options.chunks, options.screen_chunks
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    say = log or (lambda line: None)
    scorer = scorer or Scorer(planner.model, calibration_text, imatrix=planner.imatrix, ctx=ctx, chunks=chunks,
                              threads=planner.threads, ngl=ngl, cache_dir=work / "scores", log=say)
    runs_before, seconds_before = scorer.runs, scorer.seconds
    plans = {c.name: c.plan for c in candidates}
    seen: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    distinct: list[str] = []
    for cand in candidates:
        key = json.dumps(cand.plan.types(), sort_keys=True)
        if key in seen:
            duplicates[cand.name] = seen[key]
        else:
            seen[key] = cand.name
            distinct.append(cand.name)
    paths: dict[str, Path] = {}
    made: list[str] = []  # files written here

    def file_of(name: str) -> Path:
        if name not in paths:
            if written and name in written:
                paths[name] = Path(written[name])
            else:
                out = work / f"{name}.gguf"
                planner.write(plans[name], out, log_path=work / f"{name}.quantize.log")
                paths[name] = out
                made.append(name)
        return paths[name]

    def score(name: str, start: int, stop: int) -> KldScore:
        types = plans[name].types()
        found = scorer.lookup(types, stop, start)
        if found is None:
            span = "" if (start, stop) == (0, chunks) else f".{start}-{stop}"
            found = scorer.score(file_of(name), types, stop, start=start, log_path=work / f"{name}{span}.kld.log")
        return found

    step = screen_chunks if 0 < screen_chunks < chunks and len(distinct) > 1 else chunks
    parts: dict[str, list[KldScore]] = {name: [] for name in distinct}
    alive, screening = distinct, {}
    for start in range(0, chunks, step):
        stop = min(start + step, chunks)
        scores = {}
        for name in alive:
            parts[name].append(score(name, start, stop))
            if len(parts[name]) == 1:
                scores[name] = parts[name][0]
            elif all(p.chunk_kld for p in parts[name]):
                scores[name] = KldScore.joined(parts[name])
            else:  # a tool that prints no chunk rows: the span is scored whole
                scores[name] = parts[name][-1] = score(name, 0, stop)
                del parts[name][:-1]
            say(f"  {name}: calibration KLD {scores[name].kld_mean:.6f} on {stop} chunks "
                f"({plans[name].achieved_bpw:.4f} bpw)")
        if start == 0 and stop < chunks:
            screening = scores
        if stop == chunks:
            break
        alive = scoring_finalists(scores, distinct, options.finalists, options.margin)
        if len(alive) == 1:
            break
    best = min(scores, key=lambda n: (scores[n].kld_mean, names.index(n)))
    file_of(best)
    if not keep:
        for name in made:
            if name != best:
                paths[name].unlink(missing_ok=True)
    return Selection(best, plans[best], paths[best], scores, duplicates, scorer.base(stop),
                     scorer.seconds - seconds_before, screening, scorer.runs - runs_before, stop)


def copy_selected(selection: Selection, out: Path | str) -> Path:
    """Put the selected GGUF at `out` (and its plan JSON beside it)."""
    out = Path(out)
    plan_json = selection.path.with_name(selection.path.name[:-5] + ".plan.json")
    if plan_json.is_file():
        with atomic_path(out.with_name(out.name[:-5] + ".plan.json")) as tmp:
            shutil.copyfile(plan_json, tmp)
    with atomic_path(out) as tmp:  # a killed copy never leaves a model that looks complete
        shutil.copyfile(selection.path, tmp)
    return out


def candidate_name(allocator: str, table: str) -> str:
    return f"{allocator}-{table.replace('+', '-')}"


@dataclass
class Choice:
    best: str  # the candidate chosen: "<allocator>-<table>"
    plan: Plan  # its plan, after the refinement when a swap was kept
    score: KldScore  # the calibration score of `plan`
    selection: Selection
    refined: list[str] = field(default_factory=list)  # the swaps kept by the refinement

    def to_json(self) -> dict:
        return {"chosen": self.best, "calibration_kld": {n: s.kld_mean for n, s in self.selection.scores.items()},
                "duplicates": self.selection.duplicates, "calibration_kld_chosen": self.score.kld_mean,
                "refined": self.refined, "chunks": self.selection.chunks,
                # the distinct plans scored: all of them on the first round (the last round may hold fewer)
                "distinct": len(self.selection.screening or self.selection.scores),
                # each plan's score on the chunks of its last round, per chunk: what a study of the rounds replays
                "scores": {n: s.to_json() for n, s in self.selection.scores.items()}}


def choose(planner: Planner, tables: Mapping[str, ErrorTableLike], allocators: Sequence[AllocatorPlugin],
           target: Target, calibration_text: Path | str, out: Path | str, work_dir: Path | str,
           options: ChooseOptions, *, written: Mapping[str, Path] | None = None, ngl: int | None = None,
           scorer: Scorer | None = None, log: Callable[[str], None] | None = None) -> Choice:
    """Plan `target` with every allocator (plugin instances) on every table, keep the plan closest to the float
    model on calibration text (optionally improved by measured swaps: tbpw.select.refine) and write it to `out`.

    Candidates are named `candidate_name(allocator, table)`; `written` maps names to GGUFs already written from
    exactly those plans; `options` as in `select_plan` and `refine_plan` (`options.tables` and
    `options.measured_quants` are the caller's: which tables to give, which plans it wrote); a shared `scorer`
    keeps the float logits and the scores for other targets. Only the calibration text is ever read; `work_dir`
    keeps the logs."""
    candidates, problems = [], {}
    for table_name, table in tables.items():
        problem = planner.problem(table, target)
        for allocator in allocators:
            name = candidate_name(allocator.name, table_name)
            candidates.append(PlanCandidate(name, planner.plan(table, target, allocator, problem=problem)))
            problems[name] = problem
    work = Path(work_dir)
    own_scorer = scorer is None
    scorer = scorer or Scorer(planner.model, calibration_text, imatrix=planner.imatrix, ctx=options.ctx,
                              chunks=options.chunks, threads=planner.threads, ngl=ngl, cache_dir=work / "scores", log=log)
    selection = select_plan(candidates, planner, calibration_text, work, options, ngl=ngl, written=written,
                            scorer=scorer, log=log)
    plan, score, refined = selection.plan, selection.scores[selection.best], []
    if options.refine_rounds:
        from tbpw.select.refine import refine_plan

        refinement = refine_plan(planner, problems[selection.best], plan, calibration_text, work, options, ngl=ngl,
                                 start_score=score if selection.chunks == options.chunks else None, scorer=scorer,
                                 log=log)
        if refinement.accepted:
            plan, score, refined = refinement.plan, refinement.score, refinement.accepted
    out = Path(out)
    if refined:
        planner.write(plan, out, log_path=work / "chosen.quantize.log")
    else:
        copy_selected(selection, out)
    leftovers = [*work.glob("*.gguf"), *(work.rglob("*.logits") if own_scorer else [])]
    for leftover in leftovers:
        leftover.unlink()  # logits of a large vocabulary run to gigabytes; the logs stay
    return Choice(selection.best, plan, score, selection, refined)
