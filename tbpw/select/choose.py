"""End-to-end choice among candidate plans by KL divergence on CALIBRATION text.

Per-tensor errors do not add up exactly (docs/quality.md), so tbpw makes
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

from tbpw.allocate.budget import Target
from tbpw.allocate.plan import Plan
from tbpw.allocate.problem import ErrorTableLike
from tbpw.allocate.service import Planner
from tbpw.errors import TbpwError
from tbpw.files.atomic import atomic_path
from tbpw.llamacpp.perplexity import BaseLogits, KldScore, calibration_base, kld


@dataclass(frozen=True)
class PlanCandidate:
    name: str
    plan: Plan


@dataclass
class Selection:
    best: str
    plan: Plan
    path: Path  # the best candidate's quantized GGUF (kept in work_dir)
    scores: dict[str, KldScore]  # candidate -> its score on the calibration chunks
    duplicates: dict[str, str] = field(default_factory=dict)  # candidate -> the earlier one with the same types
    base: BaseLogits | None = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"best": self.best, "path": str(self.path), "scores": {k: v.to_json() for k, v in self.scores.items()},
                "duplicates": self.duplicates, "seconds": round(self.seconds, 3),
                "calibration": {"text": str(self.base.text), "ctx": self.base.ctx, "chunks": self.base.chunks}
                if self.base else None}


def select_plan(candidates: Sequence[PlanCandidate], planner: Planner, calibration_text: Path | str,
                work_dir: Path | str, *, ctx: int = 512, chunks: int = 16, ngl: int | None = None,
                keep: bool = False, written: Mapping[str, Path] | None = None,
                log: Callable[[str], None] | None = None) -> Selection:
    """Write every candidate plan, score each against the float model on `chunks` x `ctx` tokens of
    `calibration_text`, and return the lowest mean KL divergence (ties: the earlier candidate).

    Candidates with the same type map are scored once. `written` maps candidate names to GGUFs already
    written from their plans (they are scored as they are, not written again). The winner's GGUF stays
    (in `work_dir`, or where `written` had it); the ones written here are deleted unless `keep`.
    """
    if not candidates:
        raise TbpwError("select_plan needs at least one candidate plan")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise TbpwError("candidate plan names must be unique")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    say = log or (lambda line: None)
    threads = planner.threads
    base = calibration_base(planner.model, calibration_text, work, ctx=ctx, chunks=chunks, threads=threads, ngl=ngl)
    seconds = base.seconds
    seen: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    scores: dict[str, KldScore] = {}
    paths: dict[str, Path] = {}
    for cand in candidates:
        key = json.dumps(cand.plan.types(), sort_keys=True)
        if key in seen:
            duplicates[cand.name] = seen[key]
            continue
        seen[key] = cand.name
        if written and cand.name in written:
            out = Path(written[cand.name])
        else:
            out = work / f"{cand.name}.gguf"
            seconds += planner.write(cand.plan, out, log_path=work / f"{cand.name}.quantize.log").seconds
        score = kld(out, base, threads=threads, ngl=ngl, log_path=work / f"{cand.name}.kld.log")
        seconds += score.seconds
        scores[cand.name] = score
        paths[cand.name] = out
        say(f"  {cand.name}: calibration KLD {score.kld_mean:.6f} ({cand.plan.achieved_bpw:.4f} bpw)")
    best = min(scores, key=lambda n: (scores[n].kld_mean, names.index(n)))
    if not keep:
        for name, path in paths.items():
            if name != best and not (written and name in written):
                path.unlink(missing_ok=True)
    plan = next(c.plan for c in candidates if c.name == best)
    return Selection(best, plan, paths[best], scores, duplicates, base, seconds)


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
                "refined": self.refined}


def choose(planner: Planner, tables: Mapping[str, ErrorTableLike], allocators: Sequence[tuple[str, Mapping]],
           target: Target, calibration_text: Path | str, out: Path | str, work_dir: Path | str, *,
           written: Mapping[str, Path] | None = None, ctx: int = 512, chunks: int = 16, refine_rounds: int = 0,
           refine_tries: int = 4, ngl: int | None = None, log: Callable[[str], None] | None = None) -> Choice:
    """Plan `target` with every allocator on every table, keep the plan closest to the float model on
    calibration text (optionally improved by measured swaps: tbpw.select.refine) and write it to `out`.

    Candidates are named `candidate_name(allocator, table)`; `written` maps names to GGUFs already written from
    exactly those plans. Only the calibration text is ever read; `work_dir` keeps the tools' logs."""
    candidates, problems = [], {}
    for table_name, table in tables.items():
        problem = planner.problem(table, target)
        for allocator, options in allocators:
            name = candidate_name(allocator, table_name)
            candidates.append(PlanCandidate(name, planner.plan(table, target, allocator, options, problem=problem)))
            problems[name] = problem
    work = Path(work_dir)
    selection = select_plan(candidates, planner, calibration_text, work, ctx=ctx, chunks=chunks, ngl=ngl,
                            written=written, log=log)
    plan, score, refined = selection.plan, selection.scores[selection.best], []
    if refine_rounds:
        from tbpw.select.refine import refine_plan

        refinement = refine_plan(planner, problems[selection.best], plan, calibration_text, work,
                                 rounds=refine_rounds, tries=refine_tries, ctx=ctx, chunks=chunks, ngl=ngl,
                                 start_score=score, log=log)
        if refinement.accepted:
            plan, score, refined = refinement.plan, refinement.score, refinement.accepted
    out = Path(out)
    if refined:
        planner.write(plan, out, log_path=work / "chosen.quantize.log")
    else:
        copy_selected(selection, out)
    for leftover in [*work.glob("*.gguf"), *work.glob("*.logits")]:
        leftover.unlink()  # logits of a large vocabulary run to gigabytes; the logs stay
    return Choice(selection.best, plan, score, selection, refined)
