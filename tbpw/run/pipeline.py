"""`tbpw run`: the whole workflow of a recipe as a graph of stages, resumable.

    model -> data-* -> baseline (PPL + logits) -> imatrix -> measure -> stock-* / quant-* -> eval-* -> bench-* -> report

Other people's GGUFs of the same model (`compare_files`) are checked against the model right after it is
made, then evaluated and benched like the run's own quants. Every GGUF the run writes records its provenance
(tbpw.model.provenance), and the report folder gets a Hugging Face model card with the kept quants beside it.

Every stage goes through `RunDir.run`, so a finished stage is skipped, a changed input (or a damaged
output) reruns only what depends on it, and a killed run resumes. The driver holds its run directory from
start to end (a second run on it is refused); the workers that run its stages write into it without claiming
it. `Pipeline.graph()` declares the stages and what each needs (tbpw.run.graph); the recipe's executor plugin
runs them, independent ones at once (tbpw.run.execute), and the report is written from their results.
Nothing here knows a particular allocator, metric, dataset, evaluator or executor: they come from the recipe
and the plugin registries.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tbpw import __version__
from tbpw.allocate.budget import Target
from tbpw.allocate.service import Planner
from tbpw.data.files import DatasetContext, DatasetFile
from tbpw.errors import Interrupted, TbpwError
from tbpw.evaluate.context import EvalContext
from tbpw.files import paths
from tbpw.files.atomic import write_json
from tbpw.llamacpp import progress
from tbpw.llamacpp.bench import bench, markdown_rows, speeds
from tbpw.llamacpp.build import active_build
from tbpw.llamacpp.perplexity import base_logits
from tbpw.llamacpp.quantize import quantize
from tbpw.measure.table import ErrorTable
from tbpw.model.f16check import ClipCount, count_gguf, count_safetensors
from tbpw.model.ggml_types import FLOAT_TYPES
from tbpw.model.inventory import ModelInventory
from tbpw.plugin.base import Column
from tbpw.plugin.manager import get_manager
from tbpw.run import compare
from tbpw.run.graph import Ref, Resources, TaskGraph, WorkerCheck, resolve
from tbpw.run.recipe import PluginRef, Recipe, RecipeTarget, check_ready, evaluator_instances, recipe_sha256
from tbpw.run.rundir import RunDir, StageOutcome

if TYPE_CHECKING:
    from tbpw.quantize.store import TensorStore
    from tbpw.select.scoring import Scorer


@dataclass
class Quant:
    """One quantized model of the run: a stock type or a (target, allocator) plan."""

    name: str
    kind: str  # "stock", "tbpw", or "other" (someone else's file, from compare_files)
    path: Path
    bpw: float
    size_bytes: int
    target: str | None = None
    allocator: str | None = None
    types: dict[str, str] = field(default_factory=dict)
    note: str = ""


Log = Callable[[str], None]


@dataclass(frozen=True)
class Stage:
    """A task's call: one stage method of the recipe's pipeline. Picklable, so any worker can run it: it builds
    the pipeline there (the same recipe, build and run directory) and logs through the worker's `log`."""

    recipe: Recipe
    force: frozenset[str]
    method: str
    label: str = ""  # the run's label in a sweep, before each line it logs

    def __call__(self, *args, log: Log, **kwargs):
        say = (lambda line: log(f"{self.label}: {line}")) if self.label else log
        return getattr(Pipeline(self.recipe, set(self.force), log=say, claim=False), self.method)(*args, **kwargs)


class Pipeline:
    def __init__(self, recipe: Recipe, force: set[str] | None = None, log: Log = print, *, claim: bool | None = True):
        """`claim`: hold the run directory (the driver); a worker running one stage of it does not; None: only
        plan (`graph`, `tbpw.run.costplan`), without opening the run directory at all."""
        self.recipe = recipe
        self.force = force or set()
        self.log = log
        self.build = active_build()
        assert recipe.output_dir is not None
        self._claim = claim
        if claim is not None:
            _ = self.run_dir  # the driver holds the folder from the start: a second run is refused at once
        self.manager = get_manager()
        self.evaluators = evaluator_instances(recipe)
        self.notes: list[str] = [recipe.model.note] if recipe.model.note else []
        self.quant_refs: dict[str, Ref] = {}  # each quant of the report (in its order): the task result it is
        self.label = ""  # the run's label within a sweep
        self.rivals: dict[str, list[str]] = {}  # target label -> its tbpw quants, which compete for its selection
        self.conditional: dict[str, str] = {}  # task -> target label: it runs for that target's selected quant only
        self.releases: list[str] = []  # the tasks that delete the quants `keep: chosen` does not keep
        self._scorers: dict[int, Scorer] = {}

    @cached_property
    def run_dir(self) -> RunDir:
        if self._claim is None:
            raise TbpwError("a pipeline made only to plan runs no stage: make it with claim=True")
        assert self.recipe.output_dir is not None
        return RunDir(self.recipe.output_dir, claim=self._claim)

    @cached_property
    def store(self) -> TensorStore | None:
        """The tensor store every quant of the run is assembled from (None: llama-quantize writes each)."""
        if not self.recipe.store:
            return None
        from tbpw.quantize.store import TensorStore

        return TensorStore(threads=self.recipe.measure.threads)

    def scorer(self, model: Path, imatrix: Path, text: DatasetFile, ctx: int) -> Scorer:
        """One set of float logits on the calibration text (per ctx) and its kept scores, shared by calibrate and
        every target's choice; it holds as many chunks as either of them asks for."""
        if ctx not in self._scorers:
            from tbpw.select.scoring import Scorer

            wanted = [o.chunks for o in (self.recipe.calibrate, self.recipe.choose) if o is not None and o.ctx == ctx]
            self._scorers[ctx] = Scorer(model, text.path, imatrix=imatrix, ctx=ctx, chunks=max(wanted, default=0),
                                        threads=self.recipe.measure.threads, ngl=self.recipe.ngl,
                                        log=lambda line: self.log(f"  scoring{line}"))
        return self._scorers[ctx]

    @cached_property
    def provenance(self) -> dict[str, str]:
        """What every GGUF the run writes records besides what the Planner knows (tbpw.model.provenance). Any
        worker works it out alike: the calibration data stage has finished before anything is quantized."""
        r = self.recipe
        assert r.measure.metric is not None
        calibration = self.dataset("calibration", quiet=True)
        return {"metric": r.measure.metric.name, "recipe_sha256": recipe_sha256(r),
                "calibration": calibration.description or calibration.path.name,
                "calibration_sha256": self.run_dir.fingerprint(calibration.path)}

    def close(self) -> None:
        """Release the run directory (`run` does at its end) for the next run."""
        if "run_dir" in self.__dict__:
            self.run_dir.close()

    # ---------------------------------------------------------------------------------- plumbing

    def _stage(self, name: str, inputs: dict[str, Path], options, body, *, quiet: bool = False) -> StageOutcome:
        """Run (or skip, when finished) one stage; `quiet`: say nothing of a skipped one (a stage looked up again)."""
        forced = name in self.force or any(name.startswith(f"{f}-") for f in self.force)
        with progress.stage(name):
            outcome = self.run_dir.run(name, inputs, {"options": options, "build": self.build.key}, body, force=forced)
        if not (quiet and outcome.skipped):
            self.log(f"{'skip' if outcome.skipped else 'done'}  {name}" + ("" if outcome.skipped else f"  ({outcome.seconds:.1f} s)"))
        return outcome

    # ---------------------------------------------------------------------------------- stages

    def model(self) -> Path:
        src = self.recipe.model
        options = src.model_dump(mode="json", exclude={"note"})
        if src.asset is not None:
            from tbpw.data.assets import demo_model

            demo = demo_model()  # the only asset model so far: SmolLM2-135M, a dequantized Q4_1 checkpoint
            self.notes.append(demo.note)
            return demo.f16
        if src.gguf is not None:
            gguf = src.gguf
            inv = ModelInventory.load(gguf)
            stored = {t.stored_type for t in inv.tensors}
            if stored <= FLOAT_TYPES and (src.outtype.upper() in stored or stored <= {"F32"}):
                return Path(gguf)

            def requantize(folder: Path) -> dict:
                notes = self._check_f16(count_gguf(Path(gguf))) if "BF16" in stored and src.outtype == "f16" else []
                if not stored <= FLOAT_TYPES:
                    notes.append(f"the source {Path(gguf).name} is quantized ({', '.join(sorted(stored - FLOAT_TYPES))}): "
                                 "its float baseline is a dequantization, so source types are lossless (see assets caveat)")
                quantize(Path(gguf), folder / "base.gguf", imatrix=None, base_type=src.outtype.upper(),
                         extra=["--allow-requantize"], log_path=folder / "quantize.log", build=self.build)
                return {"model": "base.gguf", "notes": notes}

            return self._model_outcome(self._stage("model", {"source": Path(gguf)}, options, requantize))
        if src.hub:
            folder_src = self._hub_folder()
        else:
            assert src.path is not None  # a model source is exactly one of asset, gguf, hub, path
            folder_src = Path(src.path)

        def convert(folder: Path) -> dict:
            from tbpw.llamacpp import convert as converter

            notes = self._check_f16(count_safetensors(folder_src)) if src.outtype == "f16" else []
            converter.convert_hf(folder_src, folder / "base.gguf", outtype=src.outtype, log_path=folder / "convert.log")
            return {"model": "base.gguf", "notes": notes}

        return self._model_outcome(self._stage("model", {"source": folder_src}, options, convert))

    def _model_outcome(self, outcome: StageOutcome) -> Path:
        # Notes live in the stage's result, so a rerun that skips the stage still reports them.
        self.notes += outcome.result.get("notes", [])
        return outcome.path("base.gguf")

    def _check_f16(self, counted: ClipCount) -> list[str]:
        """Refuse an F16 conversion that would clip weights, unless allowed; the report's notes otherwise."""
        if counted.clips and not self.recipe.model.allow_f16_clipping:
            raise TbpwError(f"F16 would clip this model's weights ({counted.summary()}): set model.outtype: bf16, "
                            "or model.allow_f16_clipping: true to accept it")
        return [f"F16 conversion clipped weights: {counted.summary()}"] if counted.clips else []

    def _hub_folder(self) -> Path:
        src = self.recipe.model
        assert src.hub is not None  # called for a hub model only
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise TbpwError("model.hub needs huggingface_hub: pip install 'tbpw[hub]'") from None
        try:
            return Path(snapshot_download(repo_id=src.hub, revision=src.revision))
        except Exception as exc:
            raise TbpwError(f"could not download {src.hub}@{src.revision} from the Hugging Face hub ({type(exc).__name__}): "
                            f"check the network and HF_TOKEN, or fill the hub cache and set HF_HUB_OFFLINE=1") from exc

    def datasets(self) -> dict[str, DatasetFile]:
        return {role: self.dataset(role) for role in self.recipe.datasets}

    def dataset(self, role: str, *, quiet: bool = False) -> DatasetFile:
        ref = self.recipe.datasets[role]
        context = DatasetContext(cache_dir=paths.assets(), resolve=self.manager.datasets().create)
        # Materialized every time (cheap once cached): the stage is keyed by the content the dataset gives
        # now, so a source file edited in place is noticed.
        made = self.manager.datasets().create(ref.name, ref.options).materialize(context)

        def keep(folder: Path) -> dict:
            target = folder / Path(made.path).name
            shutil.copyfile(made.path, target)
            return {"file": target.name, "kind": made.kind, "description": made.description,
                    "attribution": made.attribution}

        out = self._stage(f"data-{role}", {"source": Path(made.path)}, ref, keep, quiet=quiet)
        return DatasetFile(out.path(out.result["file"]), out.result["kind"], out.result["description"],
                           out.result["attribution"])

    def baseline(self, model: Path, text: DatasetFile) -> StageOutcome:
        ev = self.recipe.evaluation

        def body(folder: Path) -> dict:
            base = base_logits(model, text.path, folder / "base.logits", ctx=ev.ctx, chunks=ev.chunks,
                               threads=ev.threads, ngl=self.recipe.ngl, log_path=folder / "perplexity.log",
                               build=self.build)
            return {"logits": "base.logits", "ppl": base.ppl, "ppl_error": base.ppl_error}

        return self._stage("baseline", {"model": model, "text": text.path},
                           {**ev.model_dump(mode="json", exclude={"scope"}), "ngl": self.recipe.ngl}, body)

    def imatrix(self, model: Path, text: DatasetFile) -> Path:
        opts = self.recipe.imatrix

        def body(folder: Path) -> dict:
            from tbpw.llamacpp.imatrix import make_imatrix

            make_imatrix(model, text.path, folder / "imatrix.gguf", collector=opts.collector, chunks=opts.chunks,
                         ctx=opts.ctx, ngl=self.recipe.ngl, log_path=folder / "imatrix.log",
                         extra_args=["--process-output"] if opts.process_output else [], build=self.build)
            return {"imatrix": "imatrix.gguf"}

        return self._stage("imatrix", {"model": model, "text": text.path}, {**opts.model_dump(mode="json"),
                           "ngl": self.recipe.ngl}, body).path("imatrix.gguf")

    def measure(self, model: Path, imatrix: Path) -> Path:
        opts = self.recipe.measure

        def body(folder: Path) -> dict:
            from tbpw.measure.engine import measure

            assert opts.metric is not None  # load_recipe fills in the registry's default
            table = measure(model, imatrix, metric=opts.metric.name, metric_options=opts.metric.options,
                            candidates=opts.candidates, sampling=opts.sampling, threads=opts.threads,
                            store=self.store.source(model, imatrix) if self.store is not None else None)
            for volatile in ("cached", "seconds", "resumed_tensors"):  # how it was obtained, not what it is: the
                table.meta.pop(volatile, None)  # same table gives the same bytes, and the stages after it the same keys
            table.write_json(folder / "errors.json")
            return {"table": "errors.json", "tensors": len(table.tensors)}

        return self._stage("measure", {"model": model, "imatrix": imatrix}, opts, body).path("errors.json")

    def stock(self, model: Path, imatrix: Path, qtype: str) -> Quant:
        def body(folder: Path) -> dict:
            out = folder / "model.gguf"
            # llama-quantize's own mixture: no allocator and no metric of tbpw's chose its types
            kv = self._planner(model, imatrix, folder).record(target=f"stock {qtype}", metric="")
            quantize(model, out, imatrix=imatrix, base_type=qtype, kv=kv, log_path=folder / "quantize.log",
                     build=self.build)
            inv = ModelInventory.load(out)
            return {"model": "model.gguf", "bpw": inv.bpw(), "size_bytes": out.stat().st_size, "types": inv.types()}

        name = f"stock-{qtype}"
        out = self._stage(name, {"model": model, "imatrix": imatrix}, {"type": qtype}, body)
        return Quant(name, "stock", out.path("model.gguf"), out.result["bpw"], out.result["size_bytes"],
                     types=out.result["types"])

    def _planner(self, model: Path, imatrix: Path, log_dir: Path) -> Planner:
        return Planner(model, imatrix, self.recipe.constraints, log_dir=log_dir, manager=self.manager,
                       provenance=self.provenance, store=self.store)

    def compare_files(self, model: Path) -> list[Quant]:
        """The recipe's `compare_files`, each found and checked to be a quant of `model` (before any work on it)."""
        base = ModelInventory.load(model)
        quants = []
        for i, ref in enumerate(self.recipe.compare_files):
            where = f"compare_files.{i}"
            path = compare.locate(ref, where)
            other = ModelInventory.load(path)
            compare.check_same_model(base, other, where)
            quants.append(Quant(ref.name, "other", path, other.bpw(), path.stat().st_size, types=other.types(),
                                note=f"not made by this run: {compare.describe(ref)}"))
            self.log(f"other {ref.name}  ({other.bpw():.4f} bpw, {compare.describe(ref)})")
        return quants

    def plan(self, model: Path, imatrix: Path, table: Path, target: RecipeTarget, budget: Target,
             allocator: PluginRef) -> Quant:
        def body(folder: Path) -> dict:
            planner = self._planner(model, imatrix, folder)
            plan = planner.plan(ErrorTable.read_json(table), budget, allocator.name, allocator.options)
            applied = planner.write(plan, folder / "model.gguf", log_path=folder / "quantize.log")
            written = ModelInventory.load(applied.path)
            if plan.shortfall:
                self.log(f"  note: {name} {plan.shortfall}")
            return {"model": "model.gguf", "plan": applied.plan_path.name, "bpw": applied.achieved_bpw,
                    "size_bytes": applied.file_bytes, "types": written.types(), "shortfall": plan.shortfall}

        name = f"quant-{target.label}-{allocator.name}"
        out = self._stage(name, {"model": model, "imatrix": imatrix, "table": table},
                          {"target": budget.to_json(), "allocator": allocator, "constraints": self.recipe.constraints},
                          body)
        return Quant(name, "tbpw", out.path("model.gguf"), out.result["bpw"], out.result["size_bytes"],
                     target=target.label, allocator=allocator.name, types=out.result["types"],
                     note=out.result.get("shortfall") or "")

    def calibrate(self, model: Path, imatrix: Path, table: Path, text: DatasetFile) -> dict[str, Path]:
        """The measured table scaled to KL divergence, one table per strength: {"<metric>+kld<s>": path}."""
        opts = self.recipe.calibrate
        assert opts is not None and self.recipe.measure.metric is not None
        metric = self.recipe.measure.metric.name

        def body(folder: Path) -> dict:
            from tbpw.select.calibrate import calibrate, calibrated_table

            measured = ErrorTable.read_json(table)
            sens = calibrate(model, imatrix, text.path, measured, probe_types=opts.probes, grouping=opts.grouping,
                             ctx=opts.ctx, chunks=opts.chunks, background=opts.background,
                             threads=self.recipe.measure.threads, ngl=self.recipe.ngl,
                             scorer=self.scorer(model, imatrix, text, opts.ctx), store=self.store,
                             log=lambda line: self.log(f"  calibrate{line}"))
            write_json(folder / "sensitivity.json", sens.to_json())
            tables = {}
            for strength in opts.strengths:
                name = f"{metric}+kld{'' if strength == 1.0 else f'{strength:g}'}"
                file = f"errors-{name.replace('+', '-')}.json"
                calibrated_table(measured, sens, strength).write_json(folder / file)
                tables[name] = file
            return {"tables": tables, "floor_kld": sens.floor_kld}

        out = self._stage("calibrate", {"model": model, "imatrix": imatrix, "table": table, "text": text.path},
                          {**opts.model_dump(mode="json"), "ngl": self.recipe.ngl}, body)
        return {name: out.path(file) for name, file in out.result["tables"].items()}

    def choose(self, model: Path, imatrix: Path, tables: dict[str, Path], target: RecipeTarget, budget: Target,
               written: dict[str, Quant], text: DatasetFile) -> Quant:
        """Every allocator on every table for `target`; the plan with the lowest KLD on calibration text wins.

        `written` holds the target's quants already made on the measured table (allocator -> quant): they are
        scored as they are, not written again."""
        opts = self.recipe.choose
        assert opts is not None and self.recipe.measure.metric is not None and self.recipe.allocators is not None
        metric = self.recipe.measure.metric.name
        allocators = self.recipe.allocators

        if opts.tables == "calibrated" and len(tables) > 1:  # the measured table is the first; calibrated ones follow
            tables = dict(list(tables.items())[1:])
            written = {}

        def body(folder: Path) -> dict:
            from tbpw.select.choose import candidate_name, choose

            choice = choose(self._planner(model, imatrix, folder), {n: ErrorTable.read_json(p) for n, p in tables.items()},
                            [(a.name, a.options) for a in allocators], budget, text.path,
                            folder / "model.gguf", folder / "work",
                            written={candidate_name(a, metric): q.path for a, q in written.items()},
                            ctx=opts.ctx, chunks=opts.chunks, screen_chunks=opts.screen_chunks,
                            finalists=opts.finalists, margin=opts.margin, refine_rounds=opts.refine_rounds,
                            refine_tries=opts.refine_tries, ngl=self.recipe.ngl,
                            scorer=self.scorer(model, imatrix, text, opts.ctx),
                            log=lambda line: self.log(f"  choose{line}"))
            inventory = ModelInventory.load(folder / "model.gguf")
            return {"model": "model.gguf", "bpw": inventory.bpw(), "size_bytes": (folder / "model.gguf").stat().st_size,
                    "types": inventory.types(), **choice.to_json()}

        inputs = {"model": model, "imatrix": imatrix, "text": text.path,
                  **{f"table {n}": p for n, p in tables.items()}, **{f"quant {a}": q.path for a, q in written.items()}}
        name = f"quant-{target.label}-choose"
        out = self._stage(name, inputs, {"target": budget.to_json(), "allocators": allocators, "ngl": self.recipe.ngl,
                                         "constraints": self.recipe.constraints, "choose": opts}, body)
        return Quant(name, "tbpw", out.path("model.gguf"), out.result["bpw"], out.result["size_bytes"],
                     target=target.label, allocator="choose", types=out.result["types"],
                     note=self._choice_note(out.result))

    @staticmethod
    def _choice_note(result: dict) -> str:
        distinct, total = len(result["calibration_kld"]), len(result["calibration_kld"]) + len(result["duplicates"])
        swaps = f", then {len(result['refined'])} measured swaps" if result["refined"] else ""
        why = (f"all {total} plans were the same" if distinct == 1 else
               f"lowest calibration KLD of {distinct} distinct plans among {total}")
        return f"chose {result['chosen']} ({why}){swaps}"

    def splits_evaluation(self) -> bool:
        """Whether each quant's evaluation runs in two stages: the selecting evaluators on every quant, the task
        evaluators on the selected ones only (`evaluation.scope: selected`, with task evaluators to keep apart)."""
        return self.recipe.evaluation.scope == "selected" and bool(self.evaluators_for("tasks"))

    def evaluators_for(self, part: str) -> list[tuple[PluginRef, Any]]:
        """The evaluators of one evaluation stage: `all`; `select`, those whose columns `select.by` ranks by (all
        a target's selection needs); `tasks`, the others (run on the selected quants only, `evaluation.scope`)."""
        if part == "all":
            return self.evaluators
        by = set(self.select_by())
        selecting = [pair for pair in self.evaluators if by & {c.key for c in pair[1].output_columns()}]
        return selecting if part == "select" else [pair for pair in self.evaluators if pair not in selecting]

    def evaluate(self, quant: Quant, base_logits: Path, data: dict[str, DatasetFile],
                 part: str = "all") -> dict[str, float]:
        ev = self.recipe.evaluation
        data_inputs = {f"data-{k}": v.path for k, v in data.items()}
        evaluators = self.evaluators_for(part)

        def body(folder: Path) -> dict:
            ctx = EvalContext(model=quant.path, log_dir=folder, base_logits=base_logits, datasets=data, ctx=ev.ctx,
                              chunks=ev.chunks, task_ctx=ev.task_ctx, ngl=self.recipe.ngl, threads=ev.threads)
            metrics: dict[str, float] = {}
            for _, evaluator in evaluators:
                metrics.update(evaluator.evaluate(ctx))
            return metrics

        # which quants the tasks run on changes nothing in one quant's numbers: it stays out of the key
        options = ev.model_dump(mode="json", exclude={"scope"})
        return self._stage(f"eval-{quant.name}{'+tasks' if part == 'tasks' else ''}",
                           {"model": quant.path, "logits": base_logits, **data_inputs},
                           {"evaluators": self.recipe.evaluators if part == "all" else [ref for ref, _ in evaluators],
                            "evaluation": options, "ngl": self.recipe.ngl},
                           body).result

    def bench(self, quant: Quant) -> dict:
        b = self.recipe.bench
        ngl = b.ngl if b.ngl is not None else self.recipe.ngl

        def body(folder: Path) -> dict:
            result = bench(quant.path, pp=b.pp, tg=b.tg, pg=b.pg, repetitions=b.repetitions, threads=b.threads,
                           ngl=ngl, log_path=folder / "bench.log", build=self.build)
            return {"speeds": speeds(result), "rows": markdown_rows(result)}

        # "rows": results of earlier versions held the speeds alone, and rerun
        return self._stage(f"bench-{quant.name}", {"model": quant.path},
                           {**b.model_dump(mode="json"), "ngl": ngl, "rows": True}, body).result

    def columns(self) -> list[Column]:
        """Every column the recipe's evaluators report, in recipe order (the report's columns)."""
        seen: dict[str, Column] = {}
        for _, evaluator in self.evaluators:
            for column in evaluator.output_columns():
                seen.setdefault(column.key, column)
        return list(seen.values())

    # ---------------------------------------------------------------------------------- stages as graph tasks
    # Thin adapters: a task's arguments are other tasks' results, these turn them into a stage's arguments.

    def model_and_notes(self) -> tuple[Path, list[str]]:
        path = self.model()
        return path, self.notes

    def plan_for(self, model: Path, imatrix: Path, table: Path, target: RecipeTarget, stock: Quant | None,
                 allocator: PluginRef) -> Quant:
        return self.plan(model, imatrix, table, target, self.budget(target, stock), allocator)

    def choose_for(self, model: Path, imatrix: Path, table: Path, calibrated: dict[str, Path] | None,
                   target: RecipeTarget, stock: Quant | None, written: dict[str, Quant], text: DatasetFile) -> Quant:
        assert self.recipe.measure.metric is not None
        tables = {self.recipe.measure.metric.name: table, **(calibrated or {})}
        return self.choose(model, imatrix, tables, target, self.budget(target, stock), written, text)

    def evaluate_with(self, quant: Quant, base: StageOutcome, data: dict[str, DatasetFile], part: str = "all",
                      rivals: dict[str, dict] | None = None) -> dict[str, float]:
        """`rivals` (quant name -> its selecting metrics): evaluate only when `quant` is the one selected of them."""
        if self.passed_over(quant, rivals):
            return {}
        return self.evaluate(quant, base.path(base.result["logits"]), data, part)

    def bench_with(self, quant: Quant, rivals: dict[str, dict] | None = None) -> dict:
        if self.passed_over(quant, rivals):
            return {}
        return self.bench(quant)

    def passed_over(self, quant: Quant, rivals: dict[str, dict] | None) -> bool:
        """Whether `quant` competes with `rivals` (`evaluation.scope: selected`) and another of them was selected."""
        return rivals is not None and self.selected(rivals) != quant.name

    def select_by(self) -> list[str]:
        """The columns that pick each target's best quant: the recipe's, else the first evaluator's ranking."""
        return self.recipe.select.by or (list(self.evaluators[0][1].ranking()) if self.evaluators else [])

    def selected(self, rivals: dict[str, dict]) -> str:
        """The name of one target's best quant among `rivals` (name -> metrics), as the report marks it."""
        return best_of(rivals, self.select_by(), self.columns())

    def release(self, quants: dict[str, Quant], rivals: dict[str, dict], after: list) -> list[str]:
        """Delete the GGUFs of one target's quants other than its selected one (`keep: chosen`), once every task
        that reads them (`after`) is done; their stages stay finished. Returns the quants whose file is gone."""
        keep = self.selected(rivals)
        gone = [name for name, q in quants.items() if name != keep]
        for name in gone:
            if self.run_dir.release(quants[name].path):
                self.log(f"deleted {name}/{quants[name].path.name}  (keep: chosen; {keep} is kept)")
        return gone

    @staticmethod
    def budget(target: RecipeTarget, stock: Quant | None) -> Target:
        if target.stock:
            assert stock is not None  # the graph passes the stock quant of a `stock:` target
            return Target.parse(bpw=stock.bpw)
        return Target.parse(bpw=target.bpw, size=target.size)

    # ---------------------------------------------------------------------------------- the whole run

    def stock_types(self) -> list[str]:
        r = self.recipe
        return list(dict.fromkeys([*r.compare_stock, *(t.stock.upper() for t in r.targets if t.stock)]))

    def graph(self) -> TaskGraph:
        """Every stage of the recipe as a task and what it needs, in the order a sequential run takes them."""
        r = self.recipe
        assert r.measure.metric is not None and r.allocators is not None
        g = TaskGraph()
        force = frozenset(self.force)
        self.rivals, self.conditional, self.releases = {}, {}, []

        def stage(method: str) -> Stage:
            return Stage(r, force, method, self.label)

        gpu = self.offloads()
        size = self.model_bytes()
        loads_model = Resources(gpu=gpu, memory=size)
        model = g.add("model", stage("model_and_notes"), resources=Resources(memory=2 * size))[0]
        # someone else's files are checked against the model before they are evaluated like the run's own
        others = (g.add("compare-files", stage("compare_files"), model, resources=Resources(memory=size))
                  if r.compare_files else None)
        data = {role: g.add(f"data-{role}", stage("dataset"), role) for role in r.datasets}
        base = g.add("baseline", stage("baseline"), model, data["evaluation"], resources=loads_model)
        imatrix = g.add("imatrix", stage("imatrix"), model, data["calibration"], resources=loads_model)
        table = g.add("measure", stage("measure"), model, imatrix, resources=Resources(memory=size))
        stock = {t: g.add(f"stock-{t}", stage("stock"), model, imatrix, t, resources=Resources(memory=size))
                 for t in self.stock_types()}
        quants: dict[str, Ref] = {f"stock-{t}": ref for t, ref in stock.items()}
        for i, other in enumerate(r.compare_files):
            assert others is not None
            quants[other.name] = others[i]
        calibrated = (g.add("calibrate", stage("calibrate"), model, imatrix, table, data["calibration"],
                            resources=loads_model) if r.calibrate is not None else None)
        for target in r.targets:
            stock_quant = stock[target.stock.upper()] if target.stock else None
            made = {}
            own_quants = r.allocators if r.writes_allocator_quants() else []
            self.rivals[target.label] = [f"quant-{target.label}-{a.name}" for a in own_quants] + (
                [f"quant-{target.label}-choose"] if r.choose is not None else [])
            for a in own_quants:
                name = f"quant-{target.label}-{a.name}"
                made[a.name] = quants[name] = g.add(name, stage("plan_for"), model, imatrix, table, target, stock_quant,
                                                    a, resources=Resources(memory=size))
            if r.choose is not None:
                name = f"quant-{target.label}-choose"
                quants[name] = g.add(name, stage("choose_for"), model, imatrix, table, calibrated, target, stock_quant,
                                     made, data["calibration"], resources=loads_model)
        quant_memory = Resources(gpu=gpu, memory=size // 2)
        bench_gpu = (r.bench.ngl if r.bench.ngl is not None else r.ngl) != 0 and gpu
        bench_resources = Resources(gpu=bench_gpu, memory=size // 2, exclusive=True)
        scoped = r.evaluation.scope == "selected"
        split = self.splits_evaluation()
        evals: dict[str, Ref] = {}
        readers: dict[str, list[Ref]] = {}  # each quant's tasks that read its file
        for name, quant in quants.items():
            evals[name] = g.add(f"eval-{name}", stage("evaluate_with"), quant, base, data, "select" if split else "all",
                                resources=quant_memory)
            readers[name] = [evals[name]]
            if r.bench.enabled and not scoped:
                readers[name].append(g.add(f"bench-{name}", stage("bench_with"), quant, resources=bench_resources))
        target_of = {name: label for label, names in self.rivals.items() for name in names}
        if scoped:  # the rest runs on the quants that need no selection, and on each target's selected one
            for name, quant in quants.items():
                label = target_of.get(name)
                rivals = {n: evals[n] for n in self.rivals[label]} if label is not None else None
                if split:
                    readers[name].append(g.add(f"eval-{name}+tasks", stage("evaluate_with"), quant, base, data,
                                               "tasks", rivals, resources=quant_memory))
                if r.bench.enabled:
                    readers[name].append(g.add(f"bench-{name}", stage("bench_with"), quant, rivals,
                                               resources=bench_resources))
                if label is not None:
                    self.conditional.update({f"eval-{name}+tasks": label, f"bench-{name}": label})
        if r.keep == "chosen":
            for label, names in self.rivals.items():
                self.releases.append(g.add(f"release-{label}", stage("release"), {n: quants[n] for n in names},
                                           {n: evals[n] for n in names},
                                           [ref for n in names for ref in readers[n]]).task)
        self.quant_refs = quants
        return g

    def offloads(self) -> bool:
        """Whether the tools that load a model put layers on a GPU (a GPU build, and `ngl` not 0)."""
        from tbpw.llamacpp.offload import gpu_layers

        return bool(gpu_layers(self.build, self.recipe.ngl))

    def model_bytes(self) -> int:
        """The float model's size as far as the recipe tells before converting (0: unknown): memory estimates."""
        src = self.recipe.model
        if src.gguf is not None and Path(src.gguf).is_file():
            return Path(src.gguf).stat().st_size
        if src.path is not None:
            return sum(p.stat().st_size for p in Path(src.path).glob("*.safetensors"))
        return 0

    def worker_check(self) -> WorkerCheck:
        return WorkerCheck(self.build.key, (self.run_dir.root,))

    def run(self, executor=None) -> Path:
        """Run the recipe's graph on `executor` (default: the recipe's) and write the report; the run directory
        is released at the end."""
        try:
            return self._run(executor)
        except (KeyboardInterrupt, Interrupted) as exc:
            kept = self.run_dir.finished()
            raise Interrupted(f"interrupted: {len(kept)} finished stage(s) are kept in {self.run_dir.root}; run the "
                              "same command again to resume (finished stages are reused, nothing is redone)",
                              cause=exc) from None
        finally:
            self.close()

    def _run(self, executor) -> Path:
        from tbpw.run.execute import execute, executor_from

        check_ready(self.recipe)  # a plugin that cannot run with this build says so before any work
        graph = self.graph()
        assert self.recipe.executor is not None  # load_recipe fills in the registry's default
        results = execute(graph, executor or executor_from(self.recipe.executor), log=self.log,
                          check=self.worker_check())
        return self.report(results)

    def report(self, results: dict) -> Path:
        """Write the report from the graph's results (task name -> result)."""
        r = self.recipe
        model, notes = results["model"]
        self.notes += [n for n in notes if n not in self.notes]
        data: dict[str, DatasetFile] = {role: results[f"data-{role}"] for role in r.datasets}
        base: StageOutcome = results["baseline"]
        imatrix: Path = results["imatrix"]
        entries: list[dict] = []
        released = {name for task in self.releases for name in results[task]}
        for name, ref in self.quant_refs.items():
            q: Quant = resolve(ref, results)
            metrics = {**results[f"eval-{name}"], **results.get(f"eval-{name}+tasks", {})}
            benched = results.get(f"bench-{name}", {})
            note = "; ".join(n for n in (q.note, "GGUF deleted after its evaluation (keep: chosen)" if name in released
                                         else "") if n)
            entries.append({"name": q.name, "kind": q.kind, "target": q.target, "allocator": q.allocator, "bpw": q.bpw,
                            "size_bytes": q.size_bytes, "metrics": metrics, "bench": benched.get("speeds", {}),
                            "bench_rows": benched.get("rows", []), "types": q.types,
                            "path": str(q.path), **({"note": note} if note else {}),
                            **({"released": True} if name in released else {})})
        columns = self.columns()
        mark_best(entries, self.select_by(), columns)
        base_inv = ModelInventory.load(model)
        base_metrics: dict[str, float] = {}
        for _, evaluator in self.evaluators:
            base_metrics.update(evaluator.baseline_values(base.result["ppl"], base.result["ppl_error"]))
        base_entry = {"name": "baseline", "kind": "base", "bpw": base_inv.bpw(), "size_bytes": model.stat().st_size,
                      "metrics": base_metrics, "bench": {}}
        from tbpw.run.modelcard import source_facts, write_model_card
        from tbpw.run.report import quality_table, write_report

        substitutes = {k: v.description for k, v in data.items() if "substitute" in v.description.lower()}
        report = {"name": r.name, "description": r.description, "model": str(model), "build": f"{self.build.build_number} "
                  f"({self.build.build_commit}, {self.build.backend})", "notes": self.notes, "select_by": r.select.by,
                  "evaluation_text": data["evaluation"].description or data["evaluation"].path.name,
                  "baseline_ppl": base.result["ppl"], "substitutes": substitutes,
                  "columns": [asdict(c) for c in columns], "entries": [base_entry, *entries],
                  "tbpw_version": __version__, "recipe": r.model_dump(mode="json", exclude={"output_dir", "executor"}),
                  "provenance": {**self.provenance, "imatrix_sha256": self.run_dir.fingerprint(imatrix)},
                  "datasets": {role: {"description": f.description, "attribution": f.attribution,
                                      "sha256": self.run_dir.fingerprint(f.path)} for role, f in data.items()},
                  "source": source_facts(r.model, model)}
        path = write_report(report, self.run_dir.root / "report")
        card = write_model_card(report, self.run_dir.root / "report")
        self.log(f"model card: {card}")
        self.log("\n" + quality_table(report["entries"], columns) + "\n")
        self.log(f"report: {path}")
        return path


def mark_best(entries: list[dict], by: list[str], columns: list[Column]) -> None:
    """Mark the best tbpw quant of each target (`best_of`)."""
    groups: dict[str, dict[str, dict]] = {}
    for e in entries:
        if e["kind"] == "tbpw":
            groups.setdefault(e["target"], {})[e["name"]] = e
    for members in groups.values():
        members[best_of({name: e["metrics"] for name, e in members.items()}, by, columns)]["selected"] = True


def best_of(metrics: dict[str, dict], by: list[str], columns: list[Column]) -> str:
    """The name whose metrics rank best by the `by` columns in order, each in its better direction (a missing
    value ranks last; ties go to the first)."""
    lower = {c.key: c.lower_is_better for c in columns if c.rankable}

    def key(name: str) -> tuple:
        values = []
        for metric in by:
            v = metrics[name].get(metric)
            values.append(float("inf") if v is None else (v if lower[metric] else -v))
        return tuple(values)

    return min(metrics, key=key)
