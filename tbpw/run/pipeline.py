"""`tbpw run`: the whole workflow of a recipe as a graph of stages, resumable.

    model -> data-* -> baseline (PPL + logits) -> imatrix -> measure -> stock-* / quant-* -> eval-* -> bench-* -> report

The stages are tbpw.stages' modules: each owns its options, its step and its cost estimate. This module only
wires them: `Pipeline.graph()` declares each stage as a task with the results it needs (tbpw.run.graph), the
selection policy (tbpw.run.selection) decides which tasks of a target run for its selected quant alone and which
files `keep: chosen` deletes, the recipe's executor plugin runs the graph (tbpw.run.execute), and the report is
written from the results (tbpw.run.report, tbpw.run.modelcard). Other people's GGUFs of the same model
(`compare_files`) are checked against the model right after it is made, then evaluated and benched like the run's
own quants. The driver holds its run directory from start to end (a second run on it is refused); the workers
that run its stages write into it without claiming it. Nothing here knows a particular allocator, metric,
dataset, evaluator or executor: they come from the recipe and the plugin registries.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tbpw.errors import Interrupted
from tbpw.jobs import Resources, WorkerCheck
from tbpw.model.inventory import ModelInventory
from tbpw.run.graph import Derived, Ref, TaskGraph, resolve
from tbpw.run.recipe import PluginRef, Recipe, check_ready, evaluator_instances, recipe_sha256
from tbpw.run.selection import SelectionRule, evaluator_columns
from tbpw.stages import (
    baseline,
    bench,
    calibrate,
    choose,
    compare,
    data,
    evaluate,
    imatrix,
    measure,
    overlap,
    plan,
    release,
    stock,
)
from tbpw.stages import model as model_stage
from tbpw.stages.choose import Choosing
from tbpw.stages.context import Log, RunSettings, StageContext, StageTask
from tbpw.stages.quant import Quant
from tbpw.version import __version__


@dataclass(frozen=True)
class RunGraph:
    """A run's task graph and what its report reads from the results."""

    tasks: TaskGraph
    quants: dict[str, Ref]  # each quant of the report, in its order: the task whose result it is
    releases: tuple[str, ...]  # the tasks that delete the quants `keep: chosen` drops (no stages of their own)


def settings_of(recipe: Recipe, force: set[str] | frozenset[str] = frozenset(), label: str = "") -> RunSettings:
    """What every stage of the recipe's run shares."""
    assert recipe.output_dir is not None and recipe.measure.metric is not None  # load() fills both in
    wanted: dict[int, int] = {}
    for options in (recipe.calibrate, recipe.choose):
        if options is not None:
            wanted[options.ctx] = max(wanted.get(options.ctx, 0), options.chunks)
    return RunSettings(output_dir=recipe.output_dir, force=frozenset(force), label=label, ngl=recipe.ngl,
                       threads=recipe.measure.threads, store=recipe.store, scorer_chunks=wanted,
                       provenance={"metric": recipe.measure.metric.name, "recipe_sha256": recipe_sha256(recipe)})


class Pipeline:
    def __init__(self, recipe: Recipe, force: set[str] | None = None, log: Log = print, *, claim: bool | None = True,
                 label: str = ""):
        """`claim`: hold the run directory (the driver); a worker running one stage of it does not; None: only
        plan (`graph`, `tbpw.run.costplan`), without opening the run directory at all. `label`: the run's label
        within a sweep (its stages log as "<label>: done  measure")."""
        self.recipe = recipe
        self.log = log
        self.settings = settings_of(recipe, force or set(), label)
        self.context = StageContext(self.settings, log, claim=claim)
        if claim is not None:
            _ = self.context.run_dir  # the driver holds the folder from the start: a second run is refused at once
        self.evaluators = evaluator_instances(recipe)
        self.columns = evaluator_columns([e for _, e in self.evaluators])
        self.rule = SelectionRule.of(recipe.select.by or (list(self.evaluators[0][1].ranking()) if self.evaluators
                                                          else []), self.columns)

    @property
    def force(self) -> frozenset[str]:
        return self.settings.force

    def close(self) -> None:
        """Release the run directory (`run` does at its end) for the next run."""
        self.context.close()

    # ---------------------------------------------------------------------------------- the graph

    def stock_types(self) -> list[str]:
        r = self.recipe
        return list(dict.fromkeys([*r.compare_stock, *(t.stock.upper() for t in r.targets if t.stock)]))

    def splits_evaluation(self) -> bool:
        """Whether each quant's evaluation runs in two stages: the selecting evaluators on every quant, the task
        evaluators on the selected ones only (`evaluation.scope: selected`, with task evaluators to keep apart)."""
        return self.recipe.evaluation.scope == "selected" and bool(self.evaluators_for("tasks"))

    def evaluators_for(self, part: evaluate.Part) -> list[PluginRef]:
        """The evaluators of one evaluation stage: `all`; `select`, those whose columns the selection ranks by
        (all a target's selection needs); `tasks`, the others (run on the selected quants only)."""
        if part == "all":
            return [ref for ref, _ in self.evaluators]
        by = set(self.rule.by)
        selecting = [ref for ref, e in self.evaluators if by & {c.key for c in e.output_columns()}]
        return selecting if part == "select" else [ref for ref, _ in self.evaluators if ref not in selecting]

    def graph(self) -> RunGraph:
        """Every stage of the recipe as a task and what it needs, in the order a sequential run takes them."""
        r, s = self.recipe, self.settings
        assert r.measure.metric is not None and r.allocators is not None
        g = TaskGraph()

        def task(step) -> StageTask:
            return StageTask(s, step)

        gpu = self.offloads()
        size = model_stage.file_bytes(r.model)
        loads_model = Resources(gpu=gpu, memory=size)
        model = g.add(model_stage.NAME, task(model_stage.run), r.model, resources=Resources(memory=2 * size),
                      estimate=model_stage.cost)[0]
        # someone else's files are checked against the model before they are evaluated like the run's own
        others = (g.add(compare.NAME, task(compare.run), model, r.compare_files, resources=Resources(memory=size),
                        estimate=compare.cost) if r.compare_files else None)
        texts = {role: g.add(data.name(role), task(data.run), role, ref, estimate=data.cost)
                 for role, ref in r.datasets.items()}
        calibration = texts["calibration"]
        g.add(overlap.NAME, task(overlap.run), calibration, texts["evaluation"], estimate=overlap.cost)
        base = g.add(baseline.NAME, task(baseline.run), model, texts["evaluation"], r.evaluation, resources=loads_model,
                     estimate=partial(baseline.cost, options=r.evaluation))
        imx = g.add(imatrix.NAME, task(imatrix.run), model, calibration, r.imatrix, resources=loads_model,
                    estimate=partial(imatrix.cost, options=r.imatrix))
        table = g.add(measure.NAME, task(measure.run), model, imx, r.measure, resources=Resources(memory=size),
                      estimate=measure.cost)
        stocks = {t: g.add(stock.name(t), task(stock.run), model, imx, t, calibration, resources=Resources(memory=size),
                           estimate=partial(stock.cost, qtype=t)) for t in self.stock_types()}
        quants: dict[str, Ref] = {stock.name(t): ref for t, ref in stocks.items()}
        for i, other in enumerate(r.compare_files):
            assert others is not None
            quants[other.name] = others[i]
        metric = measure.metric_name(r.measure)
        calibrated = (g.add(calibrate.NAME, task(calibrate.run), model, imx, table, calibration, r.calibrate, metric,
                            resources=loads_model, estimate=partial(calibrate.cost, options=r.calibrate))
                      if r.calibrate is not None else None)
        rivals: dict[str, list[str]] = {}  # target label -> its tbpw quants, which compete for its selection
        for target in r.targets:
            stock_quant = stocks[target.stock.upper()] if target.stock else None
            made: dict[str, Ref] = {}
            for a in r.allocators if r.writes_allocator_quants() else []:
                name = plan.name(target, a.name)
                made[a.name] = quants[name] = g.add(name, task(plan.run), model, imx, table, target, stock_quant, a,
                                                    r.constraints, calibration, resources=Resources(memory=size),
                                                    estimate=partial(plan.cost, target=target))
            rivals[target.label] = [plan.name(target, a) for a in made]
            if r.choose is not None:
                choosing = Choosing(target, r.choose, tuple(r.allocators), r.constraints, metric)
                name = choose.name(target)
                quants[name] = g.add(name, task(choose.run), choosing, model, imx, table, calibrated, stock_quant, made,
                                     calibration, resources=loads_model,
                                     estimate=partial(choose.cost, choosing=choosing, calibrate=r.calibrate))
                rivals[target.label].append(name)
        evals, readers = self._evaluations(g, quants, base, texts, rivals)
        releases = []
        if r.keep == "chosen":
            for target in r.targets:
                names = rivals[target.label]
                releases.append(g.add(release.name(target), task(release.run), {n: quants[n] for n in names},
                                      Derived(self.rule.best, ({n: evals[n] for n in names},)),
                                      after=tuple(ref.task for n in names for ref in readers[n]),
                                      estimate=partial(release.cost, target=target, plans=len(names))).task)
        return RunGraph(g, quants, tuple(releases))

    def _evaluations(self, g: TaskGraph, quants: dict[str, Ref], base: Ref, texts: dict[str, Ref],
                     rivals: dict[str, list[str]]) -> tuple[dict[str, Ref], dict[str, list[Ref]]]:
        """Each quant's evaluation and llama-bench tasks: (quant -> its evaluation, quant -> its tasks that read its
        file). With `evaluation.scope: selected`, the task evaluators and llama-bench run on a target's quant only
        when the selection picks it (a `when` of the graph)."""
        r = self.recipe

        def task(step) -> StageTask:
            return StageTask(self.settings, step)

        gpu = self.offloads()
        size = model_stage.file_bytes(r.model)
        quant_memory = Resources(gpu=gpu, memory=size // 2)
        bench_gpu = bench.gpu_layers(r.bench, r.ngl) != 0 and gpu
        bench_resources = Resources(gpu=bench_gpu, memory=size // 2, exclusive=True)
        scoped = r.evaluation.scope == "selected"
        split = self.splits_evaluation()
        first = evaluate.Evaluating(tuple(self.evaluators_for("select" if split else "all")), r.evaluation,
                                    "select" if split else "all")
        evals: dict[str, Ref] = {}
        readers: dict[str, list[Ref]] = {}
        for name, quant in quants.items():
            evals[name] = g.add(evaluate.name(name, first.part), task(evaluate.run), first, quant, base, texts,
                                resources=quant_memory, estimate=partial(evaluate.cost, evaluating=first))
            readers[name] = [evals[name]]
            if r.bench.enabled and not scoped:
                readers[name].append(g.add(bench.name(name), task(bench.run), r.bench, quant, resources=bench_resources,
                                           estimate=partial(bench.cost, options=r.bench)))
        if not scoped:
            return evals, readers
        tasks_part = evaluate.Evaluating(tuple(self.evaluators_for("tasks")), r.evaluation, "tasks")
        target_of = {name: label for label, names in rivals.items() for name in names}
        for name, quant in quants.items():  # the quants that need no selection, and each target's selected one
            label = target_of.get(name)
            when = Derived(self.rule.is_best, (name, {n: evals[n] for n in rivals[label]})) if label else None
            if split:
                readers[name].append(g.add(evaluate.name(name, "tasks"), task(evaluate.run), tasks_part, quant, base,
                                           texts, resources=quant_memory, when=when, otherwise={},
                                           estimate=partial(evaluate.cost, evaluating=tasks_part, alternatives=label)))
            if r.bench.enabled:
                readers[name].append(g.add(bench.name(name), task(bench.run), r.bench, quant, resources=bench_resources,
                                           when=when, otherwise={},
                                           estimate=partial(bench.cost, options=r.bench, alternatives=label)))
        return evals, readers

    def offloads(self) -> bool:
        """Whether the tools that load a model put layers on a GPU (a GPU build, and `ngl` not 0)."""
        from tbpw.llamacpp.offload import gpu_layers

        return bool(gpu_layers(self.context.build, self.recipe.ngl))

    def worker_check(self) -> WorkerCheck:
        return WorkerCheck(self.context.build.key, (self.context.run_dir.root,))

    # ---------------------------------------------------------------------------------- the run

    def run(self, executor=None) -> Path:
        """Run the recipe's graph on `executor` (default: the recipe's) and write the report; the run directory
        is released at the end."""
        try:
            return self._run(executor)
        except (KeyboardInterrupt, Interrupted) as exc:
            kept = self.context.run_dir.finished()
            raise Interrupted(f"interrupted: {len(kept)} finished stage(s) are kept in {self.context.run_dir.root}; "
                              "run the same command again to resume (finished stages are reused, nothing is redone)",
                              cause=exc) from None
        finally:
            self.close()

    def _run(self, executor) -> Path:
        from tbpw.run.execute import execute, executor_from

        check_ready(self.recipe)  # a plugin that cannot run with this build says so before any work
        graph = self.graph()
        assert self.recipe.executor is not None  # load_recipe fills in the registry's default
        results = execute(graph.tasks, executor or executor_from(self.recipe.executor), log=self.log,
                          check=self.worker_check())
        return self.report(results, graph)

    def report(self, results: dict[str, Any], graph: RunGraph) -> Path:
        """Write the report from the graph's results (task name -> result)."""
        from tbpw.run.modelcard import source_facts, write_model_card
        from tbpw.run.report import (
            Entry,
            Report,
            flag_strangers,
            public_json,
            public_path,
            public_text,
            quality_table,
            write_report,
        )

        r, build = self.recipe, self.context.build
        model, notes = results[model_stage.NAME]
        texts = {role: results[data.name(role)] for role in r.datasets}
        base: baseline.Baseline = results[baseline.NAME]
        released = {name for task in graph.releases for name in results[task]}
        run_dir = self.context.run_dir
        entries = []
        for name, ref in graph.quants.items():
            q: Quant = resolve(ref, results)
            benched = results.get(bench.name(name), {})
            note = "; ".join(n for n in (q.note, "GGUF deleted after its evaluation (keep: chosen)" if name in released
                                         else "") if n)
            entries.append(Entry(q.name, q.kind, q.bpw, q.size_bytes,
                                 metrics={**results[evaluate.name(name, "all")],
                                          **results.get(evaluate.name(name, "tasks"), {})},
                                 bench=benched.get("speeds", {}), bench_rows=benched.get("rows", []),
                                 target=q.target, allocator=q.allocator, types=q.types,
                                 path=public_path(q.path, self.context.run_dir.root), note=public_text(note),
                                 released=name in released))
        for members in _by_target(entries).values():
            members[self.rule.best({e.name: e.metrics for e in members.values()})].selected = True
        lower = [c for c in self.rule.by if self.rule.lower_is_better.get(c)]
        for warning in flag_strangers(entries, lower[0]) if lower else []:
            self.log(warning)
        base_metrics: dict[str, float] = {}
        for _, evaluator in self.evaluators:
            base_metrics.update(evaluator.baseline_values(base.ppl, base.ppl_error))
        base_entry = Entry("baseline", "base", ModelInventory.load(model).bpw(), model.stat().st_size,
                           metrics=base_metrics)
        report = Report(
            name=r.name, description=r.description, model=public_path(model, run_dir.root),
            build=f"{build.build_number} ({build.build_commit}, {build.backend})",
            notes=public_json(list(dict.fromkeys(notes))),
            select_by=r.select.by,
            evaluation_text=public_text(texts["evaluation"].description or texts["evaluation"].path.name),
            baseline_ppl=base.ppl, substitutes={k: public_text(v.description) for k, v in texts.items()
                                                if "substitute" in v.description.lower()},
            columns=self.columns, entries=[base_entry, *entries], tbpw_version=__version__,
            recipe=public_json(r.model_dump(mode="json", exclude={"output_dir", "executor"})),
            provenance={**self.context.provenance(texts["calibration"]),
                        "imatrix_sha256": run_dir.fingerprint(results[imatrix.NAME])},
            datasets={role: {"description": public_text(f.description), "attribution": public_text(f.attribution),
                             "sha256": run_dir.fingerprint(f.path)} for role, f in texts.items()},
            source=source_facts(r.model, model), overlap=results[overlap.NAME])
        path = write_report(report, run_dir.root / "report")
        card = write_model_card(report, run_dir.root / "report")
        self.log(f"model card: {card}")
        self.log("\n" + quality_table(report.entries, report.columns) + "\n")
        self.log(f"report: {path}")
        return path


def _by_target(entries: list) -> dict[str, dict[str, Any]]:
    """tbpw's quants by target (name -> entry): the groups the selection picks one of."""
    groups: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e.kind == "tbpw":
            groups.setdefault(e.target, {})[e.name] = e
    return groups
