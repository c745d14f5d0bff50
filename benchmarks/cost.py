#!/usr/bin/env python3
"""What tbpw's quality path costs: measure, calibrate, choose and the final quants of 7 targets, each stage as a
multiple of one plain stock quantization, beside the fork's own 7-target `--target-bpw` run (one cold, six warm).

    .venv/bin/python -m benchmarks.cost --model bench|synthetic|PATH [--fork-build DIR] [--recipe-set KEY=VALUE ...]
        [--levels IQ3_XXS,Q2_K,...] [--new-target 4.25] [--out docs/results/cost.md]

The run is `tbpw run`'s own graph (tbpw.run.pipeline, the recipe written into --work), executed one stage at a
time up to the targets' quants, on fresh caches: the error table, the sensitivity, the tensor store and the
calibration scores all start empty, so every stage is timed cold. With `choose`, a target's final quant is its
chosen plan (written by the choice); the allocators' measured-table quants are a stage of their own only when the
recipe asks for them (`--recipe-set choose.measured_quants=true`). The targets are the sizes of 7 stock types on
this model (`targets: [{stock: LEVEL}]`: each level's stock file is made by the run, and not counted), the imatrix
is the run's, stock llama-imatrix on the calibration side of tbpw's Wikipedia split (made once, used by both tbpw
and the fork, and not counted). Evaluation of the results is not part of either run.
Counted: llama-quantize runs, KLD runs, float-logit runs, and the quantization the tensor store did, in
plain-quantization equivalents (tensor elements quantized / model elements).
Then one more target on the warm caches (`--new-target`): its cost apart from its scoring runs, against 1.5x.
With `--fork-build`, the fork's llama-quantize (a build folder of `tbpw build --source fork`) runs the same targets:
`--target-bpw X --state-file F`, the first run cold (it measures), the six others reading the state file.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tbpw.data import assets
from tbpw.llamacpp import perplexity as perplexity_mod
from tbpw.llamacpp import quantize as quantize_mod
from tbpw.llamacpp.build import BuildInfo
from tbpw.model.inventory import ModelInventory

REPO = Path(__file__).resolve().parent.parent

DEFAULT_LEVELS = ("IQ3_XXS", "Q2_K", "Q3_K_M", "IQ4_XS", "Q4_K_M", "Q5_K_M", "Q6_K")
RECIPE = """\
name: cost-{label}
model: {{gguf: {model}}}
datasets:
  calibration: {{name: file, options: {{path: {text}}}}}
  evaluation: {{name: file, options: {{path: {text}}}}}
imatrix: {{ctx: {ctx}, chunks: {imatrix_chunks}}}
measure: {{threads: {threads}}}
targets: [{targets}]
allocators: [{{name: knapsack}}, {{name: lagrangian}}]
calibrate: {{grouping: role, ctx: {ctx}}}
choose: {{ctx: {ctx}}}
bench: {{enabled: false}}
"""


def log(line: str) -> None:
    print(line, flush=True)


@dataclass
class Counts:
    quantize_runs: int = 0
    kld_runs: int = 0
    logits_runs: int = 0
    quantize_seconds: float = 0.0
    kld_seconds: float = 0.0

    def copy(self) -> Counts:
        return Counts(**vars(self))

    def minus(self, other: Counts) -> Counts:
        return Counts(**{k: v - getattr(other, k) for k, v in vars(self).items()})


def cpu_seconds() -> float:
    """CPU time of this process and of the children it waited for (the llama.cpp tools): robust to other jobs'
    load, which stretches wall time."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Stage:
    name: str
    seconds: float
    counts: Counts
    cpu: float = 0.0
    store_equivalents: float = 0.0  # plain quantizations' worth of tensor elements the store quantized
    note: str = ""


@dataclass
class Result:
    label: str
    model_elements: int
    unit_seconds: float
    unit_cpu: float
    targets: dict[str, float]
    stages: list[Stage] = field(default_factory=list)
    new_target: Stage | None = None
    fork: list[float] = field(default_factory=list)  # seconds: cold, then warm runs
    fork_cpu: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def count_tools(counts: Counts) -> None:
    """Count every llama-quantize and llama-perplexity run tbpw makes (the tools still run for real)."""
    for module in (perplexity_mod, quantize_mod):
        real = module.run_tool

        def spy(tool, args, *a, _real=real, **kw):
            run = _real(tool, args, *a, **kw)
            text = [str(x) for x in args]
            if tool == "llama-quantize":
                counts.quantize_runs += 1
                counts.quantize_seconds += run.seconds
            elif "--kl-divergence" in text:
                counts.kld_runs += 1
                counts.kld_seconds += run.seconds
            elif "--kl-divergence-base" in text:
                counts.logits_runs += 1
            return run

        module.run_tool = spy  # type: ignore[attr-defined]


def resolve_model(spec: str, work: Path, template: Path) -> tuple[Path, str, int]:
    """(F16 GGUF, label, ctx)."""
    if spec == "bench":
        from testmodels.training.bench_model import bench_model

        return bench_model(log=log).gguf, "bench", 256
    if spec == "synthetic":
        from testmodels.gguf_writers import write_llama_like

        model = work / "synthetic-2048x5632x4.gguf"  # benchmarks/measure.py's 214 M llama, random F16 weights
        if not model.is_file():
            write_llama_like(model, template, n_embd=2048, n_ff=5632, n_layer=4, seed=1)
        return model, "synthetic-214M", 512
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"error: no model {spec!r}: use bench, synthetic or the path of an F16/BF16 GGUF")
    return path, path.stem, 512


@dataclass
class Timed:
    """A task's call, timed and counted as it runs (the executor runs one task at a time, in this process)."""

    call: Any
    name: str
    counts: Counts
    measured: dict[str, Stage]

    def __call__(self, *args, log, **kwargs):
        before, store_before = self.counts.copy(), _store_elements()
        start, cpu = time.monotonic(), cpu_seconds()
        value = self.call(*args, log=log, **kwargs)
        self.measured[self.name] = Stage(self.name, time.monotonic() - start, self.counts.minus(before),
                                         cpu_seconds() - cpu, _store_elements() - store_before)
        return value


def run_stages(recipe_path: Path, sets: list[str], wanted, counts: Counts) -> tuple[dict[str, Stage], dict]:
    """`tbpw run`'s own stages for the tasks `wanted(name)` picks (and what they need), one at a time, each timed
    and counted: (task -> its Stage, task -> its result). Evaluation and llama-bench are not among them."""
    from tbpw.run import recipe as recipe_mod
    from tbpw.run.execute import execute
    from tbpw.run.pipeline import Pipeline
    from tbpw_plugins.executors.local import Local, LocalOptions

    recipe = recipe_mod.load(recipe_path, sets)
    pipe = Pipeline(recipe, log=log)
    try:
        graph = pipe.graph()
        part = graph.tasks.needed_by(name for name in graph.quants if wanted(name))
        measured: dict[str, Stage] = {}
        for task in part:
            task.call = Timed(task.call, task.name, counts, measured)
        results = execute(part, Local(LocalOptions(workers=1)), log=log, check=pipe.worker_check(),
                          show_progress=False)
    finally:
        pipe.close()
    return measured, results


def run(args: argparse.Namespace) -> Result:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, label, ctx = resolve_model(args.model, work, Path(args.template))
    ctx = args.ctx or ctx
    inventory = ModelInventory.load(model)

    # fresh caches: every stage is timed cold
    caches = work / f"caches-{time.strftime('%Y%m%d-%H%M%S')}"
    for var, sub in (("TBPW_MEASURE_CACHE", "measure"), ("TBPW_SENSITIVITY_CACHE", "sensitivity"),
                     ("TBPW_STORE", "store"), ("TBPW_CALIBRATION_CACHE", "calibration")):
        os.environ[var] = str(caches / sub)
    recipe_path = work / f"cost-{label}.yaml"
    recipe_path.write_text(RECIPE.format(label=label, model=model, text=assets.wiki_split().calibration,
                                         threads=args.threads, ctx=ctx, imatrix_chunks=args.imatrix_chunks,
                                         targets=", ".join(f"{{stock: {level}}}" for level in args.levels)))
    sets = [f"output_dir={caches / 'run'}", *args.recipe_set]
    counts = Counts()
    count_tools(counts)
    count_store()
    measured, results = run_stages(recipe_path, sets, lambda name: name.startswith("quant-"), counts)
    imatrix = results["imatrix"]
    targets = {level: results[f"stock-{level}"].bpw for level in args.levels}

    plain = []  # the unit: one plain stock Q4_K_M quantization with the run's imatrix, best of two
    for _ in range(2):
        cpu = cpu_seconds()
        seconds = quantize_mod.quantize(model, work / "plain.gguf", imatrix=imatrix, base_type="Q4_K_M",
                                        threads=args.threads, log_path=work / "plain.log").seconds
        plain.append((seconds, cpu_seconds() - cpu))
    (work / "plain.gguf").unlink()
    unit, unit_cpu = min(plain)
    result = Result(label, inventory.n_elements, unit, unit_cpu, targets)
    log(f"{label}: {inventory.n_elements / 1e6:.1f} M weights; one plain Q4_K_M quantization {unit:.2f} s; "
        f"targets {', '.join(f'{k} {v:.4f}' for k, v in targets.items())}")
    from tbpw.run import recipe as recipe_mod

    recipe = recipe_mod.load(recipe_path, sets)
    result.notes.append("recipe: " + ", ".join(f"{k}: {v}" for k, v in (
        ("calibrate", recipe.calibrate.model_dump() if recipe.calibrate else None),
        ("choose", recipe.choose.model_dump() if recipe.choose else None),
        ("allocator quants", recipe.writes_allocator_quants()), ("store", recipe.store),
        ("sampling", recipe.measure.sampling.model_dump(exclude_defaults=True) or "default"))))
    result.notes.append("not counted: the imatrix (made once, used by both) and each level's stock file, whose size "
                        "is the target (`targets: [{stock: LEVEL}]`)")
    # the stages as tbpw run's graph made them: with `choose`, a target's final quant is its chosen plan; each
    # allocator's measured-table plan is a quant of its own only when the recipe says so
    for name in ("measure", "calibrate"):
        if name in measured:
            result.stages.append(measured[name])
    for level in args.levels:
        own = [s for n, s in measured.items() if n.startswith(f"quant-like-{level}-") and not n.endswith("-choose")]
        if own:
            result.stages.append(_summed(f"allocator quants {level}", own))
        if f"quant-like-{level}-choose" in measured:
            chosen = measured[f"quant-like-{level}-choose"]
            result.stages.append(Stage(f"choose and the final quant {level}", chosen.seconds, chosen.counts, chosen.cpu,
                                       chosen.store_equivalents))
    for stage in result.stages:
        stage.store_equivalents /= inventory.n_elements
    if args.new_target:
        extra = f"targets=[{', '.join(f'{{stock: {level}}}' for level in args.levels)}, {{bpw: {args.new_target}}}]"
        more, _ = run_stages(recipe_path, [*sets, extra], lambda name: name.startswith(f"quant-{args.new_target:g}bpw-"),
                             counts)
        new = _summed(f"new target {args.new_target} bpw (warm)", list(more.values()))
        new.store_equivalents /= inventory.n_elements
        result.new_target = new

    if args.fork_build:
        build = BuildInfo.load(Path(args.fork_build))
        state = work / f"{label}.bpw_state"
        state.unlink(missing_ok=True)
        for i, bpw in enumerate(targets.values()):
            out = work / "fork.gguf"
            cpu = cpu_seconds()
            run_ = quantize_mod.quantize(model, out, imatrix=imatrix, base_type="Q8_0", threads=args.threads,
                                         extra=["--target-bpw", repr(bpw), "--state-file", state],
                                         log_path=work / f"fork-{i}.log", build=build)
            out.unlink(missing_ok=True)
            result.fork.append(run_.seconds)
            result.fork_cpu.append(cpu_seconds() - cpu)
            log(f"  fork {'cold' if i == 0 else 'warm'} {bpw:.4f} bpw: {run_.seconds:.1f} s")
        commit = build.build_commit if build.build_commit != "unknown" else args.fork_commit or "commit not recorded"
        result.notes.append(f"fork: {build.source_name} build {build.build_number} ({commit}), "
                            "`--target-bpw X --state-file F`, the same imatrix and threads")
    return result


def _summed(name: str, stages: list[Stage]) -> Stage:
    total = Stage(name, sum(s.seconds for s in stages), Counts(), sum(s.cpu for s in stages),
                  sum(s.store_equivalents for s in stages))
    for s in stages:
        for k, v in vars(s.counts).items():
            setattr(total.counts, k, getattr(total.counts, k) + v)
    return total


_STORES: list = []  # every tensor store this process made (each stage makes its own)


def count_store() -> None:
    """Keep every tensor store the stages make, to add up what they quantized (tbpw counts it per store)."""
    from tbpw.quantize.store import TensorStore

    made = TensorStore.__post_init__

    def keep(self, _made=made):
        _made(self)
        _STORES.append(self)

    TensorStore.__post_init__ = keep  # type: ignore[method-assign]


def _store_elements() -> int:
    """Tensor elements the tensor stores of this process have quantized so far."""
    return sum(store.quantized_elements for store in _STORES)


def markdown(r: Result, args: argparse.Namespace) -> str:
    unit, unit_cpu = r.unit_seconds, r.unit_cpu
    lines = [f"### {args.name or r.label}", "",
             f"- {r.model_elements / 1e6:.1f} M weights; the unit is one plain stock `llama-quantize --imatrix ... "
             f"Q4_K_M` ({unit:.2f} s wall, {unit_cpu:.2f} s CPU; best of 2, {args.threads} threads); targets: the exact "
             "bpw of " + ", ".join(f"{k} ({v:.4f})" for k, v in r.targets.items()),
             *(f"- {n}" for n in r.notes),
             f"- a shared 2-core machine ({args.load_note}): other jobs' load stretches wall time, so CPU time (this "
             "process and the tools it ran) is given beside it; ratios compare runs made back to back", ""]
    lines += ["| stage | seconds | x plain | CPU s | x plain CPU | llama-quantize runs | KLD runs | float-logit runs "
              "| store quantization (x plain) |", "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[str, list[Stage]] = {}
    for s in r.stages:
        per_target = s.name.startswith(("allocator quants", "choose"))
        groups.setdefault(s.name.rsplit(" ", 1)[0] if per_target else s.name, []).append(s)
    total = Stage("total", 0.0, Counts())
    for name, members in groups.items():
        row = Stage(name if len(members) == 1 else f"{name} ({len(members)} targets)",
                    seconds=sum(m.seconds for m in members), counts=Counts(), cpu=sum(m.cpu for m in members),
                    store_equivalents=sum(m.store_equivalents for m in members))
        for m in members:
            for k, v in vars(m.counts).items():
                setattr(row.counts, k, getattr(row.counts, k) + v)
        lines.append(_row(row, unit, unit_cpu))
        total.seconds += row.seconds
        total.cpu += row.cpu
        total.store_equivalents += row.store_equivalents
        for k, v in vars(row.counts).items():
            setattr(total.counts, k, getattr(total.counts, k) + v)
    lines.append(_row(total, unit, unit_cpu, bold=True))
    if r.fork:
        fork_total, fork_cpu = sum(r.fork), sum(r.fork_cpu)
        warm, warm_cpu = sum(r.fork[1:]), sum(r.fork_cpu[1:])
        lines += [f"| fork `--target-bpw`, cold | {r.fork[0]:.1f} | {r.fork[0] / unit:.1f}x | {r.fork_cpu[0]:.1f} | "
                  f"{r.fork_cpu[0] / unit_cpu:.1f}x | 1 | – | – | – |",
                  f"| fork, {len(r.fork) - 1} warm | {warm:.1f} | {warm / unit:.1f}x | {warm_cpu:.1f} | "
                  f"{warm_cpu / unit_cpu:.1f}x | {len(r.fork) - 1} | – | – | – |",
                  f"| **fork total** | **{fork_total:.1f}** | **{fork_total / unit:.1f}x** | **{fork_cpu:.1f}** | "
                  f"**{fork_cpu / unit_cpu:.1f}x** | {len(r.fork)} | – | – | – |",
                  "", f"tbpw's total is **{total.seconds / fork_total:.2f}x** the fork's 7-target wall time and "
                  f"**{total.cpu / fork_cpu:.2f}x** its CPU time (bar: 2x)."]
    else:
        lines += ["", f"tbpw's total is {total.seconds / unit:.1f}x one plain quantization's wall time, "
                  f"{total.cpu / unit_cpu:.1f}x its CPU time (bar without the fork: 40x)."]
    if r.new_target is not None:
        n = r.new_target
        apart = n.seconds - n.counts.kld_seconds
        lines += ["", f"{n.name}: {n.seconds:.1f} s in all, {n.counts.kld_runs} KLD runs ({n.counts.kld_seconds:.1f} s); "
                  f"apart from those {apart:.1f} s = **{apart / unit:.2f}x** one plain quantization (bar: 1.5x)."]
    return "\n".join(lines) + "\n"


def _row(s: Stage, unit: float, unit_cpu: float, bold: bool = False) -> str:
    b = "**" if bold else ""
    c = s.counts
    return (f"| {b}{s.name}{b} | {b}{s.seconds:.1f}{b} | {b}{s.seconds / unit:.1f}x{b} | {b}{s.cpu:.1f}{b} | "
            f"{b}{s.cpu / unit_cpu:.1f}x{b} | {c.quantize_runs} | {c.kld_runs} | {c.logits_runs} | "
            f"{s.store_equivalents:.2f} |")


def write_section(path: Path, name: str, text: str) -> None:
    import re

    from tbpw.files.atomic import write_text

    block = f"<!-- cost:{name} -->\n{text}<!-- /cost:{name} -->"
    doc = path.read_text(encoding="utf-8") if path.is_file() else "# Cost\n"
    pattern = re.compile(rf"<!-- cost:{re.escape(name)} -->.*?<!-- /cost:{re.escape(name)} -->", re.S)
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip("\n") + "\n\n" + block + "\n"
    write_text(path, doc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench", help="bench (tbpw's trained model), synthetic (214 M), or a GGUF path")
    p.add_argument("--levels", default=",".join(DEFAULT_LEVELS))
    p.add_argument("--fork-build", help="a build folder of the fork (tbpw build --source fork; never committed)")
    p.add_argument("--fork-commit", help="the fork's commit, for the docs, when its build did not record one (a "
                   "source folder without git)")
    p.add_argument("--recipe-set", action="append", default=[], help="KEY=VALUE override of the cost recipe")
    p.add_argument("--new-target", type=float, default=4.25, help="one more target on the warm caches (0: none)")
    p.add_argument("--ctx", type=int, default=0, help="calibration context (default 256 for bench, 512 otherwise)")
    p.add_argument("--imatrix-chunks", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/tbpw-cost")
    p.add_argument("--template", default=str(Path(os.environ.get("TBPW_SHARED", REPO.parent / "shared"))
                                             / "fixtures" / "fork-tiny" / "tiny-f16.gguf"),
                   help="synthetic: the GGUF whose tokenizer the 214 M model takes (the fork's tiny model)")
    p.add_argument("--load-note", default="see the run's date", help="what the machine's load was, for the docs")
    p.add_argument("--name", help="section name in the output (default: the model's label)")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "cost.md"))
    args = p.parse_args()
    args.levels = [x.strip() for x in args.levels.split(",") if x.strip()]
    result = run(args)
    text = markdown(result, args)
    print(text)
    write_section(Path(args.out), args.name or result.label, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
