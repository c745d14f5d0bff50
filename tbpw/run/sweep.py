"""`tbpw sweep`: a matrix of models x recipes (x override sets) run as one task graph, one combined table.

    name: tiny-sweep
    recipe: recipes/tiny.yaml            # every run's recipe (or `recipes: {label: file, ...}`)
    models:                              # label -> the recipe's `model:` for that run
      llama: {gguf: models/llama-f16.gguf}
      moe: {path: models/moe-hf, outtype: bf16}
    variants:                            # optional: label -> --set overrides of that variant
      greedy: ["allocators=[{name: greedy}]"]
    set: ["targets=[{stock: Q4_K_M}, {bpw: 3.5}]"]   # optional: overrides of every run
    executor: {name: ray, options: {address: auto}}
    output_dir: runs/tiny-sweep          # default: runs/<name> beside the sweep file

Each run is an ordinary recipe run in `<output_dir>/<model>/<recipe>[-<variant>]/` with its own report; their
stages are one graph on one executor, so the quantizations and evaluations of every model share the
workers. The combined table has, per model and target, the best quant (the recipe's selection), its value
of the first ranking column (the KL divergence for the default evaluator) and that of the stock quant at
the same size, and their ratio.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from tbpw.errors import TbpwError
from tbpw.files.atomic import write_json, write_text
from tbpw.options import Strict
from tbpw.run import recipe as recipes
from tbpw.run.graph import TaskGraph
from tbpw.run.recipe import ExecutorRef

LABEL = r"^[A-Za-z0-9._-]+$"
# A stock quant is "at the same size" as a tbpw quant when their bits per weight differ by at most this.
SAME_SIZE_BPW = 0.05
Log = Callable[[str], None]


class Sweep(Strict):
    name: str = Field(pattern=LABEL)
    recipe: Path | None = None
    recipes: dict[str, Path] | None = None
    models: dict[str, dict[str, Any]] = Field(min_length=1)
    variants: dict[str, list[str]] = Field(default_factory=dict)
    set: list[str] = Field(default_factory=list)
    executor: ExecutorRef | None = None
    output_dir: Path | None = None

    @model_validator(mode="after")
    def _one_recipe_field(self) -> Sweep:
        if (self.recipe is None) == (self.recipes is None):
            raise ValueError("give exactly one of recipe (one file) and recipes (label -> file)")
        return self

    @field_validator("models", "recipes", "variants")
    @classmethod
    def _labels(cls, value: dict | None) -> dict | None:
        import re

        for label in value or {}:
            if not re.match(LABEL, label):
                raise ValueError(f"label {label!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
        return value


@dataclass
class SweepRun:
    label: str  # model/recipe[-variant]
    model: str
    recipe_label: str
    pipeline: Any  # tbpw.run.pipeline.Pipeline
    graph: Any  # tbpw.run.pipeline.RunGraph: the run's own graph
    names: dict[str, str]  # the run's task name -> the sweep graph's


def load(path: Path | str, overrides: list[str] | None = None, executor: str | None = None,
         output_dir: Path | None = None) -> tuple[Sweep, list]:
    """Read a sweep file and load every run's recipe (each validated as `tbpw run` would)."""
    path = Path(path)
    if not path.is_file():
        raise TbpwError(f"sweep file {path} does not exist: check the path")
    raw = recipes._strip_lines(recipes._read_yaml(path))
    try:
        sweep = Sweep.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        what = (f"unknown field {loc!r}" if first["type"] == "extra_forbidden" else
                f"field {loc!r}: {first['msg']}" if loc else first["msg"].removeprefix("Value error, "))
        raise TbpwError(f"{path}: {what}") from exc
    base = path.resolve().parent
    out = output_dir or sweep.output_dir or (base / "runs" / sweep.name)
    sweep.output_dir = out if out.is_absolute() else base / out
    if executor:
        sweep.executor = ExecutorRef(name=executor)
    recipe_files = {sweep.recipe.stem: sweep.recipe} if sweep.recipe is not None else dict(sweep.recipes or {})
    variants = sweep.variants or {"": []}
    loaded = []
    for model_label, model in sweep.models.items():
        source = _rebase_model(dict(model), base)
        for recipe_label, file in recipe_files.items():
            file = file if file.is_absolute() else base / file
            for variant, sets in variants.items():
                folder = recipe_label + (f"-{variant}" if variant else "")
                run_sets = [f"model={json.dumps(source)}", *sweep.set, *sets, *(overrides or []),
                            f"output_dir={sweep.output_dir / model_label / folder}"]
                try:
                    recipe = recipes.load(file, run_sets)
                except TbpwError as exc:
                    raise TbpwError(f"{path}: run {model_label}/{folder}: {exc}") from exc
                recipe.name = f"{recipe.name}-{model_label}" + (f"-{variant}" if variant else "")
                loaded.append((f"{model_label}/{folder}", model_label, folder, recipe))
    return sweep, loaded


def _rebase_model(model: dict, base: Path) -> dict:
    for key in ("path", "gguf"):
        if isinstance(model.get(key), str):
            value = Path(model[key]).expanduser()
            model[key] = str(value if value.is_absolute() else base / value)
    return model


def run(path: Path | str, overrides: list[str] | None = None, executor: str | None = None,
        output_dir: Path | None = None, log: Log = print) -> Path:
    """Run every (model, recipe, variant) of the sweep as one graph, write each report and the combined table."""
    from tbpw.jobs import WorkerCheck
    from tbpw.run.execute import execute, executor_from
    from tbpw.run.pipeline import Pipeline

    sweep, loaded = load(path, overrides, executor, output_dir)
    graph = TaskGraph()
    runs: list[SweepRun] = []
    try:
        for label, model, recipe_label, recipe in loaded:
            pipeline = Pipeline(recipe, log=log, label=label)  # its stages log as "<label>: done  measure"
            recipes.check_ready(recipe)
            run_graph = pipeline.graph()
            names = graph.merge(run_graph.tasks, prefix=f"{label}/")
            runs.append(SweepRun(label, model, recipe_label, pipeline, run_graph, names))
        if sweep.executor is None:  # the first run's recipe says (load() filled in the registry's default)
            sweep.executor = loaded[0][3].executor
        assert sweep.executor is not None
        from tbpw.plugin.manager import get_manager

        executors = get_manager().executors()
        if not sweep.executor.name:
            sweep.executor.name = executors.default_name()
        executors.validate_options(sweep.executor.name, sweep.executor.options)
        roots = tuple(r.pipeline.context.run_dir.root for r in runs)
        check = WorkerCheck(runs[0].pipeline.context.build.key, roots)
        log(f"sweep {sweep.name}: {len(runs)} runs ({', '.join(r.label for r in runs)})")
        results = execute(graph, executor_from(sweep.executor), log=log, check=check)
        rows = []
        for r in runs:
            report_path = r.pipeline.report({name: results[new] for name, new in r.names.items()}, r.graph)
            report = json.loads(report_path.with_suffix(".json").read_text())
            rows += combined_rows(r.model, r.recipe_label, report, report_path)
        assert sweep.output_dir is not None
        table = combined_table(rows)
        write_json(sweep.output_dir / "sweep.json", {"name": sweep.name, "rows": rows})
        write_text(sweep.output_dir / "sweep.md", f"# Sweep {sweep.name}\n\n{table}\n")
        log("\n" + table + "\n")
        log(f"sweep table: {sweep.output_dir / 'sweep.md'}")
        return sweep.output_dir / "sweep.md"
    finally:
        for r in runs:
            r.pipeline.close()  # each run directory is released for the next run


def combined_rows(model: str, recipe: str, report: dict, report_path: Path) -> list[dict]:
    """Per target of one run's report: the best quant, its first ranking column and stock's at the same size."""
    columns = {c["key"]: c for c in report["columns"]}
    key = report["select_by"][0] if report["select_by"] else None
    entries = report["entries"]
    stock = [e for e in entries if e["kind"] == "stock"]
    rows = []
    for e in (e for e in entries if e.get("selected")):
        same = min((s for s in stock if abs(s["bpw"] - e["bpw"]) <= SAME_SIZE_BPW),
                   key=lambda s: abs(s["bpw"] - e["bpw"]), default=None)
        value = e["metrics"].get(key) if key else None
        stock_value = same["metrics"].get(key) if same and key else None
        rows.append({"model": model, "recipe": recipe, "target": e["target"], "best": e["name"], "bpw": e["bpw"],
                     "metric": key, "label": columns.get(key, {}).get("label", key), "value": value,
                     "stock": same["name"] if same else None, "stock_bpw": same["bpw"] if same else None,
                     "stock_value": stock_value,
                     "ratio": value / stock_value if value is not None and stock_value else None,
                     "report": str(report_path)})
    return rows


def combined_table(rows: list[dict]) -> str:
    """The sweep's Markdown table: one row per model, recipe and target."""
    label = rows[0]["label"] if rows else "value"

    def num(v: float | None, digits: int = 6) -> str:
        return "–" if v is None else f"{v:.{digits}f}"

    lines = [f"| Model | Recipe | Target | Best quant | BPW | {label} | Stock at that size | Stock BPW | Stock {label} "
             f"| Ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['recipe']} | {r['target']} | {r['best']} | {r['bpw']:.4f} | {num(r['value'])} "
                     f"| {r['stock'] or '–'} | {num(r['stock_bpw'], 4)} | {num(r['stock_value'])} "
                     f"| {num(r['ratio'], 3) if r['ratio'] is not None else '–'} |")
    return "\n".join(lines)
