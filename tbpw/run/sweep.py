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
workers. The labels name those folders: plain names, one folder each. Like `tbpw run`, a sweep writes only into a
folder that is absent, empty or its own (marked `.tbpw-sweep.json`), and refuses any other before any work. The
combined table has, per model and target, the best quant (the recipe's selection), its value of the first ranking
column (the KL divergence for the default evaluator) and that of the stock quant at the same size, and their
ratio.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from tbpw.errors import Problems, TbpwError
from tbpw.files.atomic import write_json, write_text
from tbpw.options import Strict
from tbpw.run import recipe as recipes
from tbpw.run.graph import TaskGraph
from tbpw.run.recipe import PLAIN_NAME, ExecutorRef
from tbpw.stages.rundir import is_run_dir, ownership_problem
from tbpw.version import __version__

# A sweep's folder is tbpw's, like a run directory (tbpw.stages.rundir), when it carries this marker; its runs are
# run directories of their own, inside it.
MARKER = ".tbpw-sweep.json"
TABLE, ROWS = "sweep.md", "sweep.json"
# A stock quant is "at the same size" as a tbpw quant when their bits per weight differ by at most this.
SAME_SIZE_BPW = 0.05
Log = Callable[[str], None]


class Sweep(Strict):
    name: str = Field(pattern=PLAIN_NAME)
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
        seen: dict[str, str] = {}
        for label in value or {}:
            _check_label(label)
            # one folder each, also where the file system ignores case
            if (other := seen.setdefault(label.casefold(), label)) != label:
                raise ValueError(f"labels {other!r} and {label!r} name the same folder where case is ignored: "
                                 "rename one")
        return value

    @field_validator("models")
    @classmethod
    def _beside_the_table(cls, value: dict) -> dict:
        for label in value:
            if label.casefold() in (TABLE, ROWS):
                raise ValueError(f"model label {label!r} is the name of the sweep's table: rename the model")
        return value

    @model_validator(mode="after")
    def _one_folder_per_run(self) -> Sweep:
        if self.recipe is not None:
            _check_label(self.recipe.stem, f"the recipe file's name {self.recipe.name!r}",
                         "rename the file or give `recipes: {label: file}`")
        seen: dict[str, tuple[str, str]] = {}
        for recipe_label in self.recipe_files():
            for variant in self.variants or {"": []}:
                folder = run_folder(recipe_label, variant)
                other = seen.setdefault(folder.casefold(), (recipe_label, variant))
                if other != (recipe_label, variant):
                    raise ValueError(f"recipe {other[0]!r} with variant {other[1]!r} and recipe {recipe_label!r} "
                                     f"with variant {variant!r} would both run in folder {folder!r}: rename one "
                                     "of the labels")
        return self

    def recipe_files(self) -> dict[str, Path]:
        """Each recipe's label and file: the file's stem for a single `recipe:`."""
        return {self.recipe.stem: self.recipe} if self.recipe is not None else dict(self.recipes or {})


def _check_label(label: str, what: str = "", fix: str = "") -> None:
    # a label names a folder of the sweep: no path, no "." or "..", no hidden folder
    if not re.match(PLAIN_NAME, label):
        raise ValueError(f"{what or f'label {label!r}'}: use letters, digits, '.', '_' and '-', not starting with "
                         f"a dot (it names a folder of the sweep){'; ' + fix if fix else ''}")


def run_folder(recipe_label: str, variant: str) -> str:
    """The folder of one (recipe, variant) run inside its model's folder."""
    return recipe_label + (f"-{variant}" if variant else "")


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
    """Read a sweep file and load every run's recipe (each validated as `tbpw run` would). An output folder that
    tbpw may not write into (see `output_problem`) is refused here, before any work."""
    path = Path(path)
    if not path.is_file():
        raise TbpwError(f"sweep file {path} does not exist: check the path")
    raw = recipes._strip_lines(recipes._read_yaml(path, what="sweep file"))
    try:
        sweep = Sweep.model_validate(raw)
    except ValidationError as exc:
        raise Problems([f"{path}: {line}" for line in _describe(exc)]) from None
    base = path.resolve().parent
    out = output_dir or sweep.output_dir or (base / "runs" / sweep.name)
    sweep.output_dir = out if out.is_absolute() else base / out
    if executor:
        sweep.executor = ExecutorRef(name=executor)
    recipe_files = sweep.recipe_files()
    variants = sweep.variants or {"": []}
    runs = [(m, r, v) for m in sweep.models for r in recipe_files for v in variants]
    if problem := output_problem(sweep.output_dir, [Path(m, run_folder(r, v)) for m, r, v in runs]):
        raise TbpwError(problem)
    loaded = []
    for model_label, recipe_label, variant in runs:
        source = _rebase_model(dict(sweep.models[model_label]), base)
        file = recipe_files[recipe_label]
        file = file if file.is_absolute() else base / file
        folder = run_folder(recipe_label, variant)
        run_sets = [f"model={json.dumps(source)}", *sweep.set, *variants[variant], *(overrides or []),
                    f"output_dir={sweep.output_dir / model_label / folder}"]
        try:
            recipe = recipes.load(file, run_sets)
        except TbpwError as exc:
            raise TbpwError(f"{path}: run {model_label}/{folder}: {exc}") from exc
        recipe.name = f"{recipe.name}-{model_label}" + (f"-{variant}" if variant else "")
        loaded.append((f"{model_label}/{folder}", model_label, folder, recipe))
    return sweep, loaded


def _describe(exc: ValidationError) -> list[str]:
    """One line per mistake, the way a recipe's are told (an unknown field with its closest match); a required
    field that an unknown one is a misspelling of is told once, by the unknown one."""
    lines, unknown, missing = [], [], []
    for error in exc.errors():
        loc = tuple(error["loc"])
        fields = (Sweep.model_fields if len(loc) == 1 else
                  ExecutorRef.model_fields if len(loc) == 2 and loc[0] == "executor" else {})
        line = recipes._describe(error, fields).replace("Value error, ", "")
        if error["type"] == "extra_forbidden":
            unknown.append(line)
        elif error["type"] == "missing":
            missing.append((loc, line))
        else:
            lines.append(line)
    explained = [line for loc, line in missing
                 if not any(f"(did you mean {str(loc[-1])!r}?)" in u for u in unknown)]
    return [*unknown, *explained, *lines]


def output_problem(root: Path, runs: list[Path]) -> str | None:
    """Why the sweep may not write into `root`, or None. Like a run directory, the folder must be absent, empty or
    tbpw's (marked by MARKER, or holding only what a sweep made before the marker was written), so that the table
    never replaces a user's file; and each run's folder in it must be one `tbpw run` may write into."""
    if (root / MARKER).is_file() or _made_by_an_earlier_sweep(root):
        if not os.access(root, os.W_OK | os.X_OK):
            return f"output_dir {root} is not writable: choose a writable folder or fix its permissions"
    elif root.is_dir() and is_run_dir(root):
        return (f"output_dir {root} is the run directory of a `tbpw run`, not a sweep's: give the sweep a new or "
                "empty folder")
    elif problem := ownership_problem(root):
        return problem
    for run in runs:
        if problem := ownership_problem(root / run):
            return f"run {run.as_posix()}: {problem}"
    return None


def _made_by_an_earlier_sweep(root: Path) -> bool:
    """A sweep's folder from before MARKER: its table and run directories (one folder per model), nothing else."""
    try:
        entries = list(root.iterdir()) if root.is_dir() else []
        if not entries or not (root / ROWS).is_file():
            return False
        rows = json.loads((root / ROWS).read_text(encoding="utf-8"))
        if not isinstance(rows, dict) or not isinstance(rows.get("rows"), list):
            return False
        for entry in entries:
            if entry.name in (TABLE, ROWS) and entry.is_file():
                continue
            if not entry.is_dir() or not all(p.is_dir() and is_run_dir(p) for p in entry.iterdir()):
                return False
        return True
    except (OSError, ValueError):
        return False


def _mark(root: Path, name: str) -> None:
    if not (root / MARKER).is_file():
        write_json(root / MARKER, {"tbpw": __version__, "sweep": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


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
    assert sweep.output_dir is not None
    for _, _, _, recipe in loaded:
        recipes.check_ready(recipe)
    if sweep.executor is None:  # the first run's recipe says (load() filled in the registry's default)
        sweep.executor = loaded[0][3].executor
    assert sweep.executor is not None
    from tbpw.plugin.manager import get_manager

    executors = get_manager().executors()
    if not sweep.executor.name:
        sweep.executor.name = executors.default_name()
    executors.validate_options(sweep.executor.name, sweep.executor.options)
    # Marked only once nothing is left to refuse, and before the runs make their folders in it.
    _mark(sweep.output_dir, sweep.name)
    graph = TaskGraph()
    runs: list[SweepRun] = []
    try:
        for label, model, recipe_label, recipe in loaded:
            pipeline = Pipeline(recipe, log=log, label=label)  # its stages log as "<label>: done  measure"
            run_graph = pipeline.graph()
            names = graph.merge(run_graph.tasks, prefix=f"{label}/")
            runs.append(SweepRun(label, model, recipe_label, pipeline, run_graph, names))
        roots = tuple(r.pipeline.context.run_dir.root for r in runs)
        check = WorkerCheck(runs[0].pipeline.context.build.key, roots)
        log(f"sweep {sweep.name}: {len(runs)} runs ({', '.join(r.label for r in runs)})")
        results = execute(graph, executor_from(sweep.executor), log=log, check=check)
        rows = []
        for r in runs:
            report_path = r.pipeline.report({name: results[new] for name, new in r.names.items()}, r.graph)
            report = json.loads(report_path.with_suffix(".json").read_text())
            rows += combined_rows(r.model, r.recipe_label, report, report_path)
        table = combined_table(rows)
        write_json(sweep.output_dir / ROWS, {"name": sweep.name, "rows": rows})
        write_text(sweep.output_dir / TABLE, f"# Sweep {sweep.name}\n\n{table}\n")
        log("\n" + table + "\n")
        log(f"sweep table: {sweep.output_dir / TABLE}")
        return sweep.output_dir / TABLE
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
