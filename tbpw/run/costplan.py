"""What a run will cost, before it starts: its stages (to run, or finished earlier), its tool runs, disk and time.

`tbpw run RECIPE --plan` prints it and stops; every `tbpw run` prints its summary first. Nothing here runs a
tool or writes a file, and nothing here knows a stage: every task of the pipeline's graph carries its stage's
own estimate (`Task.estimate`, a `tbpw.stages.cost.Cost`), and this module adds them up:

- the model's size, from what the recipe names without converting or downloading (`tbpw.stages.model.size`);
- the stages: the graph's tasks, each marked `reuse?` when an earlier run finished it (it is skipped if its
  inputs are unchanged), `run`, or `as is` (its input is used as it is: a float GGUF model);
- the counts: llama-quantize runs, KLD runs on calibration text, evaluation runs and llama-bench runs, each at
  most what the recipe allows (of stages that are alternatives, one counts: a target's selected quant's);
- the disk: what the stages leave in the run directory, plus what is held until a stage deletes it and the
  largest file in flight (`disk_needed`, which the preflight check refuses a run by);
- the time, from two rates measured here and now: libggml quantizing Q4_K rows on one thread (times the
  threads) prices a quantization of the model, a float32 matrix product prices a forward pass at 2 FLOP per
  active weight and token. It is a rough estimate for a CPU build (each plan counted as one llama-quantize run,
  though a run with the tensor store assembles most of them), printed with its basis and what it leaves out.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tbpw.model.budget import format_size
from tbpw.stages import measure
from tbpw.stages import model as model_stage
from tbpw.stages.cost import Cost, ModelSize

if TYPE_CHECKING:
    from tbpw.run.pipeline import Pipeline, RunGraph
    from tbpw.run.recipe import Recipe



def sum_costs(costs: Iterable[Cost]) -> Cost:
    """The total of stages' costs; of the stages that are alternatives (the same `alternatives` key), one counts.
    Disk: what they leave, plus the most held until a deletion and the largest file in flight."""
    chosen: list[Cost] = []
    groups: set[str] = set()
    for c in costs:
        if c.alternatives is not None:
            if c.alternatives in groups:
                continue
            groups.add(c.alternatives)
        chosen.append(c)
    return Cost(quantizations=sum(c.quantizations for c in chosen), klds=sum(c.klds for c in chosen),
                klds_at_most=any(c.klds_at_most for c in chosen), evaluations=sum(c.evaluations for c in chosen),
                benches=sum(c.benches for c in chosen), quantize_work=sum(c.work for c in chosen),
                tokens=sum(c.tokens for c in chosen),
                disk=sum(c.disk for c in chosen) + max((c.held for c in chosen), default=0)
                + max((c.in_flight for c in chosen), default=0),
                uncounted=tuple(dict.fromkeys(u for c in chosen for u in c.uncounted)))


def estimates(graph: RunGraph, size: ModelSize | None) -> dict[str, Cost]:
    """Each task's own estimate (a task without one costs nothing worth counting)."""
    return {t.name: t.estimate(size) if t.estimate is not None else Cost() for t in graph.tasks}


# Every stage folder holds a manifest and its tools' logs; the report folder its texts and plots, and each quant's
# type map (report.json, report.md) takes about this many bytes per tensor.
STAGE_FILES_BYTES = 64 << 10
REPORT_BYTES = 2 << 20
TYPE_MAP_BYTES_PER_TENSOR = 120


def run_disk(graph: RunGraph, total: Cost, size: ModelSize) -> int:
    """The stages' disk (`sum_costs`), and what the run directory holds besides: each stage's manifest and logs,
    the report."""
    report = REPORT_BYTES + TYPE_MAP_BYTES_PER_TENSOR * size.tensors * len(graph.quants)
    return total.disk + STAGE_FILES_BYTES * len(graph.tasks) + report


def disk_needed(recipe: Recipe, size: ModelSize) -> int:
    """What the run directory of `recipe` holds at its end, plus what it needs on the way (`run_disk`)."""
    from tbpw.run.pipeline import Pipeline

    graph = Pipeline(recipe, claim=None).graph()
    return run_disk(graph, sum_costs(estimates(graph, size).values()), size)


def existing_parent(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (the disk a folder still to be made will be on)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# ------------------------------------------------------------------------------------------------ rates

@dataclass(frozen=True)
class Rates:
    quantize: float  # weights per second one thread quantizes to Q4_K (libggml, measured now)
    flops: float  # float32 matrix-product FLOP per second on this machine (measured now)
    threads: int


def measure_rates(threads: int | None = None) -> Rates | None:
    """Two quick measurements (well under a second): None when the build's libggml cannot be loaded."""
    from tbpw.errors import TbpwError
    from tbpw.llamacpp import ggml
    from tbpw.llamacpp.build import active_build

    try:
        lib = ggml.load(active_build().library("ggml-base"))
    except (TbpwError, OSError):
        return None
    rows = np.random.default_rng(0).standard_normal((64, 4096), dtype=np.float32)
    lib.quantize("Q4_K", rows[:4])  # the first call initialises ggml's tables
    quantize = _best_rate(lambda: lib.quantize("Q4_K", rows), rows.size)
    a = np.random.default_rng(1).standard_normal((256, 2048), dtype=np.float32)
    b = np.random.default_rng(2).standard_normal((2048, 2048), dtype=np.float32)
    flops = _best_rate(lambda: a @ b, 2 * 256 * 2048 * 2048)
    return Rates(quantize=quantize, flops=flops, threads=threads or os.cpu_count() or 1)


def _best_rate(call, work: float, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return work / max(best, 1e-9)


# ------------------------------------------------------------------------------------------------ the plan

@dataclass
class CostPlan:
    stages: list[tuple[str, str]]  # (task name, "run", "reuse?" when an earlier run finished it, or "as is")
    quantizations: int
    calibration_klds: int  # KLD runs on calibration text (calibrate probes, choice screening and finals)
    evaluations: int  # quant x evaluator runs
    benches: int
    disk: int | None  # bytes (None: the model's size is not known yet)
    free: int | None
    seconds: float | None
    size: ModelSize | None
    basis: list[str] = field(default_factory=list)
    uncounted: list[str] = field(default_factory=list)
    klds_at_most: bool = False  # screening in rounds stops once one plan is left: the count is an upper bound

    def summary(self) -> list[str]:
        """The lines every run starts with."""
        to_run = sum(1 for _, status in self.stages if status == "run")
        reused = sum(1 for _, status in self.stages if status == "reuse?")
        lines = [f"plan: {len(self.stages)} stages ({to_run} to run, {reused} finished earlier and reused if their "
                 f"inputs are unchanged); {self.quantizations} quantizations, "
                 f"{'at most ' if self.klds_at_most else ''}{self.calibration_klds} KLD runs on calibration text, "
                 f"{self.evaluations} evaluation runs, {self.benches} llama-bench runs"]
        if self.size is None:
            lines.append("plan: disk and time are not estimated: the model's size is not known before it is "
                         "downloaded or converted")
            return lines
        disk = f"disk: at least {format_size(self.disk or 0)} in the output folder"
        if self.free is not None:
            disk += f" ({format_size(self.free)} free)"
        lines.append(f"plan: {disk}; model: {self.size.n_elements / 1e9:.2f} B weights "
                     f"({self.size.n_active / 1e9:.2f} B active per token), from {self.size.source}")
        if self.seconds is not None:
            lines.append(f"plan: time: roughly {_duration(self.seconds)} on this machine's CPU for the stages to run, plus what "
                         "is not counted (tbpw run --plan gives the basis)")
        return lines

    def lines(self) -> list[str]:
        """The whole plan, as `tbpw run --plan` prints it."""
        out = [f"{status:7s}{name}" for name, status in self.stages]
        out += ["", *self.summary()]
        out += [f"basis: {b}" for b in self.basis]
        out += [f"not counted: {u}" for u in self.uncounted]
        return out


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cost_plan(pipeline: Pipeline, rates: Rates | None = None) -> CostPlan:
    """The plan of `pipeline`'s recipe: counts for the whole recipe, time for the stages still to run; `rates`
    (else measured now) price the time."""
    recipe = pipeline.recipe
    root = Path(recipe.output_dir or ".")
    size = model_stage.size(recipe.model)
    graph = pipeline.graph()
    costs = estimates(graph, size)
    stages = [(name, "as is" if cost.as_is else "reuse?" if (root / name / "manifest.json").is_file()
               and not pipeline.settings.forced(name) else "run")
              for name, cost in costs.items() if name not in graph.releases]  # the deletions are no stages
    total = sum_costs(costs.values())
    free = shutil.disk_usage(existing_parent(root)).free
    plan = CostPlan(stages, total.quantizations, total.klds, total.evaluations, total.benches,
                    run_disk(graph, total, size) if size is not None else None, free, None, size,
                    klds_at_most=total.klds_at_most)
    rates = rates or measure_rates(recipe.measure.threads)
    if size is None or rates is None:
        if rates is None and size is not None:
            plan.uncounted.append("time: no llama.cpp build to measure this machine's rates with")
        return plan
    todo = sum_costs(costs[name] for name, status in stages if status == "run")
    per_quant = size.n_elements / (rates.quantize * rates.threads)
    per_token = 2.0 * size.n_active / rates.flops
    plan.seconds = per_quant * todo.work + todo.tokens * per_token
    plan.basis = [
        f"one quantization of the model ~{_duration(per_quant)}: libggml quantizes {rates.quantize / 1e6:.1f} M "
        f"weights/s to Q4_K on one thread here, x {rates.threads} threads (IQ types are 2-4x slower)",
        f"the measurement ~{measure.WORK_IN_QUANTIZATIONS:g} quantizations (docs/results/scale.md)",
        f"one token through the model ~{per_token * 1e3:.1f} ms: 2 FLOP per active weight at {rates.flops / 1e9:.0f} "
        f"GFLOP/s (a float32 matrix product here; a GPU build runs far faster); {todo.tokens / 1e6:.2f} M tokens counted",
    ]
    plan.uncounted += [*todo.uncounted,
                       "task evaluators' tasks beyond one pass over the evaluation chunks; downloads; conversion"]
    return plan
