"""`tbpw run`: the whole workflow of a recipe, stage by stage, resumable.

    model -> data-* -> baseline (PPL + logits) -> imatrix -> measure -> stock-* / quant-* -> eval-* -> bench-* -> report

Every stage goes through `RunDir.run`, so a finished stage is skipped, a changed input reruns only what
depends on it, and a killed run resumes. Nothing here knows a particular allocator, metric, dataset or
evaluator: they come from the recipe and the plugin registries.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import paths
from .atomic import write_json
from .contracts import DatasetContext, DatasetFile, EvalContext
from .errors import TbpwError
from .f16check import ClipCount, count_gguf, count_safetensors
from .gguf_model import ModelInventory
from .llamacpp import parsers
from .llamacpp.build import active_build
from .llamacpp.tools import run_tool
from .plugins import get_manager
from .recipe import PluginRef, Recipe, Target
from .rundir import RunDir, StageOutcome

FLOAT_TYPES = {"F32", "F16", "BF16"}


@dataclass
class Quant:
    """One quantized model of the run: a stock type or a (target, allocator) plan."""

    name: str
    kind: str  # "stock" or "tbpw"
    path: Path
    bpw: float
    size_bytes: int
    target: str | None = None
    allocator: str | None = None
    types: dict[str, str] = field(default_factory=dict)
    note: str = ""


Log = Callable[[str], None]


class Pipeline:
    def __init__(self, recipe: Recipe, force: set[str] | None = None, log: Log = print):
        self.recipe = recipe
        self.force = force or set()
        self.log = log
        self.build = active_build()
        assert recipe.output_dir is not None
        self.run_dir = RunDir(recipe.output_dir)
        self.manager = get_manager()
        self.notes: list[str] = [recipe.model.note] if recipe.model.note else []

    # ---------------------------------------------------------------------------------- plumbing

    def _stage(self, name: str, inputs: dict[str, Path], options, body) -> StageOutcome:
        forced = name in self.force or any(name.startswith(f"{f}-") for f in self.force)
        outcome = self.run_dir.run(name, inputs, {"options": options, "build": self.build.key}, body, force=forced)
        self.log(f"{'skip' if outcome.skipped else 'done'}  {name}" + ("" if outcome.skipped else f"  ({outcome.seconds:.1f} s)"))
        return outcome

    def _tool(self, tool: str, args: list, folder: Path, log_name: str):
        return run_tool(tool, args, log_path=folder / log_name, build=self.build)

    # ---------------------------------------------------------------------------------- stages

    def model(self) -> Path:
        src = self.recipe.model
        options = src.model_dump(mode="json", exclude={"note"})
        if src.asset is not None:
            from .assets import demo_model

            demo = demo_model()  # the only asset model so far: SmolLM2-135M, a dequantized Q4_1 checkpoint
            self.notes.append(demo.note)
            return demo.f16
        if src.gguf is not None:
            inv = ModelInventory.load(src.gguf)
            stored = {t.stored_type for t in inv.tensors}
            if stored <= FLOAT_TYPES and (src.outtype.upper() in stored or stored <= {"F32"}):
                return Path(src.gguf)

            def requantize(folder: Path) -> dict:
                notes = self._check_f16(count_gguf(Path(src.gguf))) if "BF16" in stored and src.outtype == "f16" else []
                if not stored <= FLOAT_TYPES:
                    notes.append(f"the source {Path(src.gguf).name} is quantized ({', '.join(sorted(stored - FLOAT_TYPES))}): "
                                 "its float baseline is a dequantization, so source types are lossless (see assets caveat)")
                self._tool("llama-quantize", ["--allow-requantize", str(src.gguf), str(folder / "base.gguf"), src.outtype.upper()],
                           folder, "quantize.log")
                return {"model": "base.gguf", "notes": notes}

            return self._model_outcome(self._stage("model", {"source": Path(src.gguf)}, options, requantize))
        folder_src = self._hub_folder() if src.hub else Path(src.path)

        def convert(folder: Path) -> dict:
            from .llamacpp import convert as converter

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
        files = {}
        for role in type(self.recipe.datasets).model_fields:
            ref: PluginRef | None = getattr(self.recipe.datasets, role)
            if ref is None:
                continue
            dataset = self.manager.datasets().create(ref.name, ref.options)

            def materialize(folder: Path, dataset=dataset) -> dict:
                made = dataset.materialize(DatasetContext(cache_dir=paths.assets()))
                target = folder / Path(made.path).name
                shutil.copyfile(made.path, target)
                return {"file": target.name, "kind": made.kind, "description": made.description,
                        "attribution": made.attribution}

            out = self._stage(f"data-{role}", {}, ref, materialize)
            files[role] = DatasetFile(out.path(out.result["file"]), out.result["kind"], out.result["description"],
                                      out.result["attribution"])
        return files

    def baseline(self, model: Path, text: DatasetFile) -> StageOutcome:
        ev = self.recipe.evaluation

        def body(folder: Path) -> dict:
            args = ["-m", str(model), "-f", str(text.path), "-c", str(ev.ctx), "--kl-divergence-base", str(folder / "base.logits")]
            args += ["--chunks", str(ev.chunks)] if ev.chunks else []
            args += self._gpu_args(ev.ngl) + (["-t", str(ev.threads)] if ev.threads else [])
            run = self._tool("llama-perplexity", args, folder, "perplexity.log")
            result = parsers.parse_run(parsers.parse_perplexity, run)
            return {"logits": "base.logits", "ppl": result.ppl.value, "ppl_error": result.ppl.error}

        return self._stage("baseline", {"model": model, "text": text.path}, ev.model_dump(mode="json"), body)

    def imatrix(self, model: Path, text: DatasetFile) -> Path:
        opts = self.recipe.imatrix

        def body(folder: Path) -> dict:
            from .llamacpp.imatrix_run import make_imatrix

            make_imatrix(model, text.path, folder / "imatrix.gguf", collector=opts.collector, chunks=opts.chunks,
                         ctx=opts.ctx, log_path=folder / "imatrix.log",
                         extra_args=["--process-output"] if opts.process_output else [])
            return {"imatrix": "imatrix.gguf"}

        return self._stage("imatrix", {"model": model, "text": text.path}, opts, body).path("imatrix.gguf")

    def measure(self, model: Path, imatrix: Path) -> Path:
        opts = self.recipe.measure

        def body(folder: Path) -> dict:
            from .measure import measure

            table = measure(model, imatrix, metric=opts.metric.name, metric_options=opts.metric.options,
                            candidates=opts.candidates, sampling=opts.sampling, threads=opts.threads)
            table.write_json(folder / "errors.json")
            return {"table": "errors.json", "tensors": len(table.tensors)}

        return self._stage("measure", {"model": model, "imatrix": imatrix}, opts, body).path("errors.json")

    def stock(self, model: Path, imatrix: Path, qtype: str) -> Quant:
        def body(folder: Path) -> dict:
            out = folder / "model.gguf"
            self._tool("llama-quantize", ["--imatrix", str(imatrix), str(model), str(out), qtype], folder, "quantize.log")
            inv = ModelInventory.load(out)
            return {"model": "model.gguf", "bpw": inv.bpw(), "size_bytes": out.stat().st_size, "types": inv.types()}

        name = f"stock-{qtype}"
        out = self._stage(name, {"model": model, "imatrix": imatrix}, {"type": qtype}, body)
        return Quant(name, "stock", out.path("model.gguf"), out.result["bpw"], out.result["size_bytes"],
                     types=out.result["types"])

    def plan(self, model: Path, imatrix: Path, table: Path, target: Target, target_bpw: float | None,
             allocator: PluginRef) -> Quant:
        constraints = self.recipe.constraints

        def body(folder: Path) -> dict:
            from .allocate import Target as Budget
            from .allocate import allocate, build_problem
            from .apply import apply_plan
            from .measure import ErrorTable

            inventory = ModelInventory.load(model)
            budget = Budget.parse(bpw=target_bpw) if target_bpw is not None else Budget.parse(size=target.size)
            problem = build_problem(inventory, ErrorTable.read_json(table), budget, constraints)
            plan = allocate(inventory, problem, allocator.name, allocator.options, manager=self.manager)
            applied = apply_plan(plan, model, imatrix, folder / "model.gguf", log_path=folder / "quantize.log")
            written = ModelInventory.load(applied.path)
            return {"model": "model.gguf", "plan": applied.plan_path.name, "bpw": applied.achieved_bpw,
                    "size_bytes": applied.file_bytes, "types": written.types()}

        name = f"quant-{target.label}-{allocator.name}"
        out = self._stage(name, {"model": model, "imatrix": imatrix, "table": table},
                          {"target": target, "bpw": target_bpw, "allocator": allocator, "constraints": constraints}, body)
        return Quant(name, "tbpw", out.path("model.gguf"), out.result["bpw"], out.result["size_bytes"],
                     target=target.label, allocator=allocator.name, types=out.result["types"])

    def calibrate(self, model: Path, imatrix: Path, table: Path, text: DatasetFile) -> dict[str, Path]:
        """The measured table scaled to KL divergence, one table per strength: {"<metric>+kld<s>": path}."""
        opts = self.recipe.calibrate
        assert opts is not None
        metric = self.recipe.measure.metric.name

        def body(folder: Path) -> dict:
            from .measure import ErrorTable
            from .sensitivity import calibrate, calibrated_table

            measured = ErrorTable.read_json(table)
            sens = calibrate(model, imatrix, text.path, measured, probe_types=opts.probes, grouping=opts.grouping,
                             ctx=opts.ctx, chunks=opts.chunks, threads=self.recipe.measure.threads,
                             log=lambda line: self.log(f"  calibrate{line}"))
            write_json(folder / "sensitivity.json", sens.to_json())
            tables = {}
            for strength in opts.strengths:
                name = f"{metric}+kld{'' if strength == 1.0 else f'{strength:g}'}"
                file = f"errors-{name.replace('+', '-')}.json"
                calibrated_table(measured, sens, strength).write_json(folder / file)
                tables[name] = file
            return {"tables": tables, "floor_kld": sens.floor_kld}

        out = self._stage("calibrate", {"model": model, "imatrix": imatrix, "table": table, "text": text.path}, opts, body)
        return {name: out.path(file) for name, file in out.result["tables"].items()}

    def choose(self, model: Path, imatrix: Path, tables: dict[str, Path], target: Target, target_bpw: float | None,
               written: dict[str, Quant], text: DatasetFile) -> Quant:
        """Every allocator on every table for `target`; the plan with the lowest KLD on calibration text wins.

        `written` holds the target's quants already made on the measured table (allocator -> quant): they are
        scored as they are, not written again."""
        opts = self.recipe.choose
        assert opts is not None
        constraints = self.recipe.constraints
        metric = self.recipe.measure.metric.name

        def body(folder: Path) -> dict:
            from .allocate import Target as Budget
            from .measure import ErrorTable
            from .select_plan import candidate_name, choose

            budget = Budget.parse(bpw=target_bpw) if target_bpw is not None else Budget.parse(size=target.size)
            choice = choose(model, imatrix, {n: ErrorTable.read_json(p) for n, p in tables.items()},
                            [(a.name, a.options) for a in self.recipe.allocators], budget, text.path,
                            folder / "model.gguf", folder / "work", constraints=constraints,
                            written={candidate_name(a, metric): q.path for a, q in written.items()},
                            ctx=opts.ctx, chunks=opts.chunks, refine_rounds=opts.refine_rounds,
                            refine_tries=opts.refine_tries, manager=self.manager,
                            log=lambda line: self.log(f"  choose{line}"))
            inventory = ModelInventory.load(folder / "model.gguf")
            return {"model": "model.gguf", "bpw": inventory.bpw(), "size_bytes": (folder / "model.gguf").stat().st_size,
                    "types": inventory.types(), **choice.to_json()}

        inputs = {"model": model, "imatrix": imatrix, "text": text.path,
                  **{f"table {n}": p for n, p in tables.items()}, **{f"quant {a}": q.path for a, q in written.items()}}
        name = f"quant-{target.label}-choose"
        out = self._stage(name, inputs, {"target": target, "bpw": target_bpw, "allocators": self.recipe.allocators,
                                         "constraints": constraints, "choose": opts}, body)
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

    def evaluate(self, quant: Quant, base_logits: Path, data: dict[str, DatasetFile]) -> dict[str, float]:
        ev = self.recipe.evaluation
        evaluators = [(ref, self.manager.evaluators().create(ref.name, ref.options)) for ref in self.recipe.evaluators]
        data_inputs = {f"data-{k}": v.path for k, v in data.items()}

        def body(folder: Path) -> dict:
            ctx = EvalContext(model=quant.path, log_dir=folder, base_logits=base_logits, datasets=data, ctx=ev.ctx,
                              chunks=ev.chunks, task_ctx=ev.task_ctx, ngl=self._ngl(ev.ngl), threads=ev.threads,
                              tasks={"hellaswag": ev.hellaswag_tasks, "winogrande": ev.winogrande_tasks,
                                     "multiple-choice": ev.multiple_choice_tasks})
            metrics: dict[str, float] = {}
            for ref, evaluator in evaluators:
                metrics.update(evaluator.evaluate(ctx))
            return metrics

        return self._stage(f"eval-{quant.name}", {"model": quant.path, "logits": base_logits, **data_inputs},
                           {"evaluators": self.recipe.evaluators, "evaluation": ev}, body).result

    def bench(self, quant: Quant) -> dict[str, float]:
        b = self.recipe.bench

        def body(folder: Path) -> dict:
            args = ["-m", str(quant.path), "-p", str(b.pp), "-n", str(b.tg), "-r", str(b.repetitions), "-o", "json"]
            if b.pg:
                args += ["-pg", f"{b.pg[0]},{b.pg[1]}"]
            args += ["-t", str(b.threads)] if b.threads else []
            args += ["-ngl", str(self._ngl(b.ngl) or 0)]
            result = parsers.parse_run(parsers.parse_bench_json, self._tool("llama-bench", args, folder, "bench.log"))
            speeds = {}
            for test in result.tests:
                label = f"pp{test.n_prompt}+tg{test.n_gen}" if test.n_prompt and test.n_gen else (
                    f"pp{test.n_prompt}" if test.n_prompt else f"tg{test.n_gen}")
                speeds[label] = test.avg_ts
            return speeds

        return self._stage(f"bench-{quant.name}", {"model": quant.path}, b, body).result

    def _ngl(self, requested: int | None) -> int | None:
        if requested is not None:
            return requested
        return 99 if self.build.backend in ("cuda", "metal", "vulkan") else None

    def _gpu_args(self, requested: int | None) -> list[str]:
        ngl = self._ngl(requested)
        return ["-ngl", str(ngl)] if ngl is not None else []

    # ---------------------------------------------------------------------------------- the whole run

    def run(self) -> Path:
        r = self.recipe
        model = self.model()
        data = self.datasets()
        base = self.baseline(model, data["evaluation"])
        imatrix = self.imatrix(model, data["calibration"])
        table = self.measure(model, imatrix)
        stock_types = list(dict.fromkeys([*r.compare_stock, *(t.stock.upper() for t in r.targets if t.stock)]))
        quants: list[Quant] = [self.stock(model, imatrix, t) for t in stock_types]
        stock_bpw = {q.name.removeprefix("stock-"): q.bpw for q in quants}
        tables = {r.measure.metric.name: table}
        if r.calibrate is not None:
            tables.update(self.calibrate(model, imatrix, table, data["calibration"]))
        for target in r.targets:
            target_bpw = stock_bpw[target.stock.upper()] if target.stock else target.bpw
            made = {a.name: self.plan(model, imatrix, table, target, target_bpw, a) for a in r.allocators}
            quants += made.values()
            if r.choose is not None:
                quants.append(self.choose(model, imatrix, tables, target, target_bpw, made, data["calibration"]))
        entries = []
        for q in quants:
            metrics = self.evaluate(q, base.path(base.result["logits"]), data)
            speeds = self.bench(q) if r.bench.enabled else {}
            entries.append({"name": q.name, "kind": q.kind, "target": q.target, "allocator": q.allocator, "bpw": q.bpw,
                            "size_bytes": q.size_bytes, "metrics": metrics, "bench": speeds, "types": q.types,
                            "path": str(q.path), **({"note": q.note} if q.note else {})})
        select_best(entries, r.select.by)
        base_inv = ModelInventory.load(model)
        base_entry = {"name": "baseline", "kind": "base", "bpw": base_inv.bpw(), "size_bytes": model.stat().st_size,
                      "metrics": {"ppl": base.result["ppl"]}, "bench": {}}
        from .report import write_report

        substitutes = {k: v.description for k, v in data.items() if "substitute" in v.description.lower()}
        report = {"name": r.name, "description": r.description, "model": str(model), "build": f"{self.build.build_number} "
                  f"({self.build.build_commit}, {self.build.backend})", "notes": self.notes, "select_by": r.select.by,
                  "evaluation_text": data["evaluation"].description or data["evaluation"].path.name,
                  "substitutes": substitutes, "entries": [base_entry, *entries]}
        path = write_report(report, self.run_dir.root / "report")
        from .report import quality_table

        self.log("\n" + quality_table(report["entries"]) + "\n")
        self.log(f"report: {path}")
        return path


_ASCENDING = {"kld_mean": True, "kld_p99": True, "ppl": True, "rho_ppl": False, "same_top_p": False}


def select_best(entries: list[dict], by: list[str]) -> None:
    """Mark the best tbpw quant of each target (lowest mean KLD, then highest rho PPL, as configured)."""
    groups: dict[str, list[dict]] = {}
    for e in entries:
        if e["kind"] == "tbpw":
            groups.setdefault(e["target"], []).append(e)

    def key(e: dict) -> tuple:
        values = []
        for metric in by:
            v = e["metrics"].get(metric)
            v = float("inf") if v is None else (v if _ASCENDING[metric] else -v)
            values.append(v)
        return tuple(values)

    for members in groups.values():
        min(members, key=key)["selected"] = True
