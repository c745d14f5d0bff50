"""End-to-end choice among candidate plans by KL divergence on CALIBRATION text.

Per-tensor errors do not add up exactly (../shared/reference/target-bpw.md, section 10), so tbpw makes
several plans for one target (allocators, metrics, calibrated tables), writes each, and keeps the one whose
output is closest to the float model on calibration text. `select_plan` is given the calibration file and
nothing else: it cannot see the text the reported numbers are measured on.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .allocate import Plan
from .apply import apply_plan
from .errors import TbpwError
from .kld_eval import BaseLogits, KldScore, base_logits, kld


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


def select_plan(candidates: Sequence[PlanCandidate], model: Path | str, imatrix: Path | str | None,
                calibration_text: Path | str, work_dir: Path | str, *, ctx: int = 512, chunks: int = 16,
                threads: int | None = None, keep: bool = False, written: Mapping[str, Path] | None = None,
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
    base = base_logits(model, calibration_text, work / "calibration-base.logits", ctx=ctx, chunks=chunks,
                       threads=threads, log_path=work / "calibration-base.log")
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
            seconds += apply_plan(cand.plan, model, imatrix, out, threads=threads,
                                  log_path=work / f"{cand.name}.quantize.log").seconds
        score = kld(out, base, threads=threads, log_path=work / f"{cand.name}.kld.log")
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
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(selection.path, out)
    plan_json = selection.path.with_name(selection.path.name[:-5] + ".plan.json")
    if plan_json.is_file():
        shutil.copyfile(plan_json, out.with_name(out.name[:-5] + ".plan.json"))
    return out
