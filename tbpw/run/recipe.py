"""Recipes: the pydantic model of a tbpw run, read from YAML with `include:` and `--set` overrides.

Every mistake names the field and, where the YAML has it, the line: unknown keys, wrong types,
unknown plugin names (with "did you mean"), impossible targets, missing files. A recipe with several
mistakes gets all of them, one line each (`read` collects them; `load` raises them as one `Problems`).
What needs the model, the build or the disk is checked next, by `tbpw.run.preflight`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tbpw.allocate.constraints import Constraints
from tbpw.errors import Problems, TbpwError, os_error
from tbpw.evaluate.options import EvaluationOptions
from tbpw.measure.options import MeasureOptions
from tbpw.options import PluginRef, Strict
from tbpw.run.overrides import parse_assignment
from tbpw.run.selection import SelectOptions
from tbpw.select.options import CalibrateOptions, ChooseOptions
from tbpw.stages.bench import BenchOptions
from tbpw.stages.compare import CompareFile
from tbpw.stages.imatrix import ImatrixOptions
from tbpw.stages.model import ModelSource
from tbpw.stages.targets import RecipeTarget

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails


class ExecutorRef(PluginRef):
    """The executor plugin and its options; a recipe that gives only options (`--set executor.options.workers=2`)
    gets them for the registry's default executor."""

    name: str = ""


CORE_DATASET_ROLES = ("calibration", "evaluation")  # the imatrix's text, the baseline's (and KLD's) text
# A plain name: it names a folder (runs/<name>, data-<role>), so no path, no leading dot, no "..".
PLAIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_PLAIN = re.compile(PLAIN_NAME)


class Recipe(Strict):
    name: str = Field(pattern=PLAIN_NAME)
    description: str = ""
    model: ModelSource
    # role -> dataset; `calibration` and `evaluation` always, other roles as the evaluators declare them
    datasets: dict[str, PluginRef]
    imatrix: ImatrixOptions = Field(default_factory=ImatrixOptions)
    measure: MeasureOptions = Field(default_factory=MeasureOptions)
    targets: list[RecipeTarget] = Field(min_length=1)
    allocators: list[PluginRef] | None = Field(None, min_length=1)  # None: the registry's default allocator
    constraints: Constraints = Field(default_factory=Constraints)
    calibrate: CalibrateOptions | None = None
    choose: ChooseOptions | None = None
    compare_stock: list[str] = Field(default_factory=list)
    compare_files: list[CompareFile] = Field(default_factory=list)  # other people's quants of the same model
    # quantize each (tensor, type) once into the tensor store and assemble every quant from it (the file
    # llama-quantize would write, in I/O time); false: llama-quantize writes each quant
    store: bool = True
    evaluators: list[PluginRef] | None = Field(None, min_length=1)  # None: the registry's default evaluator
    ngl: int | None = Field(None, ge=0)  # GPU layers of every llama.cpp run that loads a model; None: all on a GPU build
    evaluation: EvaluationOptions = Field(default_factory=EvaluationOptions)
    bench: BenchOptions = Field(default_factory=BenchOptions)
    select: SelectOptions = Field(default_factory=SelectOptions)
    # the run's quants kept on disk: all, or chosen: each target's selected quant and the stock types (every other
    # plan's GGUF is deleted once its evaluation is done; its numbers stay in the report)
    keep: Literal["all", "chosen"] = "all"
    executor: ExecutorRef | None = None  # what runs the stages (tbpw.run.execute); None: the registry's default
    output_dir: Path | None = None  # default: runs/<name> beside the recipe

    @field_validator("datasets")
    @classmethod
    def _core_roles(cls, value: dict[str, PluginRef]) -> dict[str, PluginRef]:
        odd = [role for role in value if not _PLAIN.match(role)]
        if odd:
            raise ValueError(f"dataset role {odd[0]!r} is not a plain name (letters, digits, . _ -, not starting "
                             "with a dot): it names a folder of the run")
        missing = [role for role in CORE_DATASET_ROLES if role not in value]
        if missing:
            raise ValueError(f"datasets.{missing[0]} is required: a recipe names its calibration text (for the "
                             "imatrix) and its evaluation text (for the baseline and KL divergence)")
        return value

    @field_validator("allocators")
    @classmethod
    def _allocators_once(cls, value: list[PluginRef] | None) -> list[PluginRef] | None:
        if value is None:
            return value
        names = [ref.name for ref in value]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"{', '.join(twice)} listed more than once: each allocator names its quants, "
                             "so list it once")
        return value

    @model_validator(mode="after")
    def _calibrate_needs_choose(self) -> Recipe:
        if self.calibrate is not None and self.choose is None:
            raise ValueError("calibrate makes extra error tables that only choose uses: add `choose: {}` "
                             "(or remove calibrate)")
        return self

    @field_validator("compare_stock")
    @classmethod
    def _stock_types(cls, value: list[str]) -> list[str]:
        return [v.upper() for v in value]

    @field_validator("compare_files")
    @classmethod
    def _compare_names(cls, value: list[CompareFile]) -> list[CompareFile]:
        names = [ref.name for ref in value]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"two files would both be {twice[0]!r} in the tables: give one a `label`")
        return value

    def writes_allocator_quants(self) -> bool:
        """Whether each allocator's plan on the measured table is a quant of its own (quant-<target>-<allocator>):
        always without `choose`; with it only when asked (`choose.measured_quants`)."""
        return self.choose is None or self.choose.measured_quants


# ---------------------------------------------------------------------------------------------- loading


# A recipe is a few hundred YAML nodes. These bounds refuse what only a hostile or broken file reaches: an alias
# bomb (nine aliases of ten make 10^9 nodes out of a few lines, and every later walk of the data pays for each) and
# a nesting so deep that the recursive composer would end in a RecursionError.
MAX_YAML_NODES = 200_000  # nodes of a recipe with its includes (or of a sweep file), aliases counted expanded
MAX_YAML_DEPTH = 100  # levels of nested lists and mappings, aliases counted expanded
MAX_YAML_FILES = 100  # files read for one recipe with its includes, a file included twice counted twice


class _YamlRefused(Exception):
    """A YAML file over a bound, or with a key twice; `_read_yaml` names the file."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


class _ReadBudget:
    """The nodes and files one load has read so far (a recipe and its includes share one budget)."""

    def __init__(self, limit: int = MAX_YAML_NODES):
        self.limit, self.used, self.files = limit, 0, 0


class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line of every mapping key, for error messages, and that refuses duplicate
    keys and documents past MAX_YAML_NODES or MAX_YAML_DEPTH while it composes them (before any expansion)."""

    def __init__(self, stream: str, budget: _ReadBudget | None = None):
        super().__init__(stream)
        self._budget = budget or _ReadBudget()
        self._before = self._budget.used  # spent by the files read before this one
        self._depth = 0
        # id(node) -> (its nodes, its levels), both counted expanded: set once the node is composed, so an alias
        # to a node without it is an alias to an enclosing node (a recursive structure)
        self._extent: dict[int, tuple[int, int]] = {}

    def _spend(self, nodes: int, mark: yaml.Mark, alias: str | None = None) -> None:
        budget = self._budget
        budget.used += nodes
        if budget.used > budget.limit:
            scope = " in one recipe with its includes" if self._before else ""
            how = f" (alias *{alias} repeats {nodes:,} of them)" if alias else ""
            if alias and self._before:
                fix = "repeat fewer values through aliases and fewer files through includes"
            elif alias:
                fix = "write the values out instead of repeating them through aliases"
            elif self._before:
                fix = "include fewer files, or each file fewer times"
            else:
                fix = "a recipe or sweep file is far smaller: check that this is the file you meant"
            raise _YamlRefused(mark.line + 1, f"over the limit of {budget.limit:,} YAML nodes{scope}{how}: {fix}")

    @staticmethod
    def _too_deep(mark: yaml.Mark) -> _YamlRefused:
        return _YamlRefused(mark.line + 1, f"over the limit of {MAX_YAML_DEPTH} nested levels of lists and "
                                           "mappings: flatten the structure")

    @staticmethod
    def _refuse_duplicate_keys(node: yaml.MappingNode) -> None:
        # YAML lets a key written twice pass (the last one wins), which hides a mistake. Checked on the mapping as
        # written: a key merged in (`<<: *base`) and written again is an override, not a duplicate.
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
            if key in seen:
                raise _YamlRefused(line, f"key {key_node.value!r} appears twice (lines {seen[key]} and {line}): "
                                         "keep one")
            seen[key] = line

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)  # an undefined alias is PyYAML's error
            extent = self._extent.get(id(node))
            if extent is None:
                raise _YamlRefused(event.start_mark.line + 1, f"alias *{event.anchor} sits inside the node it "
                                                              "names (a structure without end): remove the alias")
            if self._depth + extent[1] > MAX_YAML_DEPTH:
                raise self._too_deep(event.start_mark)
            self._spend(extent[0], event.start_mark, event.anchor)
            return node
        mark = self.peek_event().start_mark
        if self._depth >= MAX_YAML_DEPTH:  # before descending: the composer recurses once per level
            raise self._too_deep(mark)
        self._spend(1, mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            self._refuse_duplicate_keys(node)
            children = [part for pair in node.value for part in pair]
        extents = [self._extent[id(child)] for child in children]
        self._extent[id(node)] = (1 + sum(n for n, _ in extents), 1 + max((d for _, d in extents), default=0))
        return node


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    mapping = loader.construct_mapping(node, deep=True)
    lines = {}
    for key_node, _ in node.value:
        lines[loader.construct_object(key_node)] = key_node.start_mark.line + 1
    mapping["__lines__"] = lines
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path, budget: _ReadBudget | None = None, what: str = "recipe") -> dict:
    """The mapping a YAML file holds, with the line of each key (`__lines__`); `budget` is shared by the files of
    one load."""
    if path.is_dir():
        raise TbpwError(f"{what} {path} is a folder: give the {what}'s YAML file")
    if not path.is_file():
        raise TbpwError(f"{what} {path} does not exist: check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TbpwError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}): "
                        f"save the {what} as UTF-8") from None
    except OSError as exc:
        raise os_error(exc, f"read the {what}", path) from None
    loader = _LineLoader(text, budget)
    try:
        data = loader.get_single_data()
    except _YamlRefused as exc:
        raise TbpwError(f"{path}:{exc.line}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise TbpwError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)}): fix the syntax") from exc
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        fields = " (name, model, datasets, targets, ...)" if what == "recipe" else ""
        raise TbpwError(f"{path}: a {what} is a mapping of fields{fields}")
    return data


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if key == "__lines__":
                merged["__lines__"] = {**base.get("__lines__", {}), **value}
            else:
                merged[key] = _merge(base.get(key), value) if key in base else value
        return merged
    return override


def _resolve_includes(path: Path, seen: tuple[Path, ...] = (), budget: _ReadBudget | None = None) -> dict:
    path = path.resolve()
    if path in seen:
        raise TbpwError(f"{path}: include cycle ({' -> '.join(p.name for p in (*seen, path))}): remove one include")
    # One budget for the whole tree of includes: a file included many times over is read (and counted) each time,
    # so a tree of includes that fans out is bounded like an alias bomb.
    budget = budget or _ReadBudget()
    budget.files += 1
    if budget.files > MAX_YAML_FILES:
        raise TbpwError(f"{path}: over the limit of {MAX_YAML_FILES} files read for one recipe with its includes "
                        "(a file included twice counts twice): include fewer files, or each file fewer times")
    data = _read_yaml(path, budget)
    includes = data.pop("include", None)
    line = data.get("__lines__", {}).pop("include", None)
    if includes is None:
        return _rebase_paths(data, path.parent)
    listed = [includes] if isinstance(includes, str) else includes
    if not isinstance(listed, list) or not listed or not all(isinstance(i, str) and i.strip() for i in listed):
        where = f"{path}:{line}" if line else str(path)
        raise TbpwError(f"{where}: include: give a recipe file name or a list of them (got {_strip_lines(includes)!r})")
    merged: dict = {}
    for inc in listed:
        merged = _merge(merged, _resolve_includes(path.parent / inc, (*seen, path), budget))
    return _merge(merged, _rebase_paths(data, path.parent))


_PATH_FIELDS = {("model", "path"), ("model", "gguf"), ("output_dir",)}


def _rebase_paths(data: dict, base: Path) -> dict:
    """Relative paths in a recipe are relative to the file that wrote them (includes keep theirs)."""
    nodes: list[tuple[Any, str]] = []
    for field_path in _PATH_FIELDS:
        node: Any = data
        for key in field_path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        nodes.append((node, field_path[-1]))
    if isinstance(data.get("compare_files"), list):
        nodes += [(item, "path") for item in data["compare_files"]]
    for node, key in nodes:
        if isinstance(node, dict) and isinstance(node.get(key), str):
            value = Path(node[key]).expanduser()
            node[key] = str(value if value.is_absolute() else (base / value))
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`--set key.path=value` (value parsed as YAML: numbers, lists, booleans)."""
    for item in overrides:
        key, value = parse_assignment(item, flag="--set", example="imatrix.chunks=8", shape="key.path=value")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise TbpwError(f"--set {key}: {part!r} is not a mapping in this recipe")
            node = node.setdefault(part, {})
        if isinstance(node, list) and parts[-1].isdigit() and int(parts[-1]) < len(node):
            node[int(parts[-1])] = value
        elif isinstance(node, dict):
            node[parts[-1]] = value
            node.get("__lines__", {}).pop(parts[-1], None)
        else:
            raise TbpwError(f"--set {key}: cannot set a field inside a {type(node).__name__}")
    return data


def _strip_lines(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _strip_lines(v) for k, v in data.items() if k != "__lines__"}
    if isinstance(data, list):
        return [_strip_lines(v) for v in data]
    return data


def _line_of(data: Any, loc: tuple) -> int | None:
    line = None
    node = data
    for part in loc:
        if isinstance(node, dict):
            line = node.get("__lines__", {}).get(part, line)
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            break
    return line


def _describe(error: ErrorDetails, model_fields: dict) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if not loc:  # a rule across fields: its message says which
        return error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(error["loc"][-1]), list(model_fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown field {loc!r}{hint}"
    if error["type"] == "missing":
        return f"field {loc!r} is required"
    return f"field {loc!r}: {error['msg']}"


def _fields_at(loc: tuple) -> dict:
    model: Any = Recipe
    for part in loc[:-1]:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            break
        annotation = fields[part].annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = candidates[0] if candidates else None
    return getattr(model, "model_fields", {}) or {}


class Findings:
    """Mistakes found in one recipe, each as `<file>:<line>: <what>` (the line where the YAML has one)."""

    def __init__(self, path: Path, raw: dict):
        self.path, self.raw = path, raw
        self.problems: list[str] = []

    def where(self, loc: tuple) -> str:
        line = _line_of(self.raw, loc)
        return f"{self.path}:{line}" if line else str(self.path)

    def add(self, loc: tuple, message: str) -> None:
        self.problems.append(f"{self.where(loc)}: {message}")


def load(path: Path | str, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe, resolving `include:` and `--set`, and validate it (plugins included); every mistake
    found is raised at once (`tbpw.errors.Problems`, one line each)."""
    recipe, problems = read(path, overrides)
    if problems:
        raise Problems(problems)
    assert recipe is not None  # a recipe without mistakes validates
    return recipe


def read(path: Path | str, overrides: list[str] | None = None) -> tuple[Recipe | None, list[str]]:
    """The recipe and every mistake found in it, one line each.

    With mistakes in some fields, the recipe returned is the rest of it (the faulty fields at their defaults),
    so that what needs the build, the model or the disk can still be checked (`tbpw.run.preflight`); None when
    too little of it is valid. A file that cannot be read as a recipe at all (missing, not UTF-8, not YAML, a
    bad include or --set) raises at once: nothing else can be checked."""
    path = Path(path)
    raw = apply_overrides(_resolve_includes(path), overrides or [])
    clean = _strip_lines(raw)
    found = Findings(path, raw)
    recipe: Recipe | None = None
    named = True
    try:
        recipe = Recipe.model_validate(clean)
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(error["loc"])
            found.add(loc, _describe(error, _fields_at(loc)))
        recipe, named = _rest_of(clean, exc)
    refs_ok = _check_plugin_refs(clean, found)
    _check_files(clean, found)
    if recipe is not None:
        if recipe.output_dir is None and named:
            recipe.output_dir = default_output_dir(path, recipe.name)
        try:
            if refs_ok:
                _check_plugin_roles(recipe, found)
            else:
                fill_defaults(recipe)
        except TbpwError as exc:
            found.problems.append(str(exc))
    return recipe, found.problems


def _rest_of(clean: dict, exc: ValidationError) -> tuple[Recipe | None, bool]:
    """The recipe without the top-level fields that failed (and whether its name is its own), or None when a
    field it cannot do without failed."""
    failed = {error["loc"][0] if error["loc"] else None for error in exc.errors()}
    if failed & {"model", "datasets", "targets", None}:
        return None, False
    rest = {k: v for k, v in clean.items() if k not in failed}
    if "name" in failed or "name" not in rest:
        rest["name"] = "recipe"
    try:
        return Recipe.model_validate(rest), "name" not in failed
    except ValidationError:
        return None, False


def default_output_dir(path: Path, name: str) -> Path:
    """runs/<name> beside the recipe (beside its recipes/ folder, for a recipe kept in one)."""
    folder = path.resolve().parent
    return (folder.parent if folder.name == "recipes" else folder) / "runs" / name


_PLUGIN_PLACES = (("metric", ("measure", "metric")), ("allocator", ("allocators",)), ("evaluator", ("evaluators",)),
                  ("dataset", ("datasets",)), ("executor", ("executor",)))


def _raw_refs(clean: dict) -> list[tuple[str, tuple, dict]]:
    """(kind, location, {name, options}) of every plugin the recipe names, read from the YAML as written (so
    that a plugin mistake is found even when another field fails validation)."""
    refs: list[tuple[str, tuple, dict]] = []
    for kind, loc in _PLUGIN_PLACES:
        node: Any = clean
        for key in loc:
            node = node.get(key) if isinstance(node, dict) else None
        if kind == "executor" and isinstance(node, dict) and "name" not in node:
            node = {**node, "name": ""}  # options alone: they are the default executor's
        if kind in ("metric", "executor"):
            items: list[tuple[Any, Any]] = [((), node)] if node is not None else []
        elif isinstance(node, list):
            items = [((i,), ref) for i, ref in enumerate(node)]
        elif isinstance(node, dict):
            items = [((role,), ref) for role, ref in node.items()]
        else:
            items = []
        for sub, ref in items:
            if isinstance(ref, dict) and isinstance(ref.get("name"), str) and isinstance(ref.get("options", {}), dict):
                refs.append((kind, (*loc, *sub), ref))
    return refs


def _check_plugin_refs(clean: dict, found: Findings) -> bool:
    """Every plugin named exists and takes its options; True when all of them do."""
    from tbpw.plugin.manager import get_manager

    manager = get_manager()
    ok = True
    for kind, loc, ref in _raw_refs(clean):
        registry = manager.registry(kind)
        try:
            registry.validate_options(ref["name"] or registry.default_name(), ref.get("options") or {})
        except TbpwError as exc:
            found.add(loc, f"{'.'.join(map(str, loc))}: {exc}")
            ok = False
    return ok


def _plugin_refs(recipe: Recipe) -> list[tuple[str, tuple, PluginRef]]:
    assert recipe.measure.metric is not None and recipe.allocators is not None and recipe.evaluators is not None
    refs: list[tuple[str, tuple, PluginRef]] = [("metric", ("measure", "metric"), recipe.measure.metric)]
    refs += [("allocator", ("allocators", i), ref) for i, ref in enumerate(recipe.allocators)]
    refs += [("evaluator", ("evaluators", i), ref) for i, ref in enumerate(recipe.evaluators)]
    refs += [("dataset", ("datasets", role), ref) for role, ref in recipe.datasets.items()]
    if recipe.executor is not None:
        refs.append(("executor", ("executor",), recipe.executor))
    return refs


def fill_defaults(recipe: Recipe) -> None:
    """Plugins the recipe leaves out are the registry's defaults (the core names none itself)."""
    from tbpw.plugin.manager import get_manager

    manager = get_manager()
    if recipe.measure.metric is None:
        recipe.measure.metric = PluginRef(name=manager.metrics().default_name())
    if recipe.allocators is None:
        recipe.allocators = [PluginRef(name=manager.allocators().default_name())]
    if recipe.evaluators is None:
        recipe.evaluators = [PluginRef(name=manager.evaluators().default_name())]
    if recipe.executor is None:
        recipe.executor = ExecutorRef(name=manager.executors().default_name())
    elif not recipe.executor.name:
        recipe.executor.name = manager.executors().default_name()


def _check_plugin_roles(recipe: Recipe, found: Findings) -> None:
    """The evaluators find the datasets they read, every dataset role is read by someone, and the selection
    ranks by columns the evaluators report (the plugins themselves are known to be valid)."""
    from tbpw.plugin.manager import get_manager

    manager = get_manager()
    fill_defaults(recipe)
    evaluators = evaluator_instances(recipe)
    wanted: dict[str, tuple[str, str]] = {}  # role -> (kind, evaluator)
    for (ref, evaluator) in evaluators:
        for role, kind in evaluator.dataset_roles().items():
            wanted[role] = (kind, ref.name)
    for role, (kind, evaluator_name) in wanted.items():
        if role not in recipe.datasets:
            found.add(("evaluators",), f"evaluator {evaluator_name!r} reads datasets.{role}: "
                                       f"add a {kind} dataset as datasets.{role}, or drop the evaluator")
            continue
        given = manager.datasets().create(recipe.datasets[role].name, recipe.datasets[role].options).kind()
        if given is not None and given != kind:
            found.add(("datasets", role), f"datasets.{role} gives a {given} file, but evaluator "
                                          f"{evaluator_name!r} reads {kind}: pick a {kind} dataset")
    for role in recipe.datasets:
        if role not in CORE_DATASET_ROLES and role not in wanted:
            readers = ", ".join(sorted(wanted)) or "none"
            found.add(("datasets", role), f"datasets.{role} is read by no evaluator (roles the evaluators read: "
                                          f"{readers}): remove it or add the evaluator that reads it")
    rankable = {c.key: c for _, e in evaluators for c in e.output_columns() if c.rankable}
    for i, key in enumerate(recipe.select.by):
        if key not in rankable:
            close = difflib.get_close_matches(key, list(rankable), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            found.add(("select", "by"), f"select.by.{i}: {key!r} is no column the evaluators rank by{hint}; "
                                        f"they rank by: {', '.join(rankable) or 'nothing'}")
    if not recipe.select.by:
        recipe.select.by = list(evaluators[0][1].ranking())


def readiness_problems(recipe: Recipe) -> list[str]:
    """Why a plugin the recipe names cannot run here (with the active llama.cpp build, with its files), one
    line per plugin; empty when all can."""
    from tbpw.plugin.manager import get_manager

    manager = get_manager()
    problems = []
    for kind, loc, ref in _plugin_refs(recipe):
        registry = manager.registry(kind)
        try:
            options = registry.validate_options(ref.name, ref.options)
        except TbpwError:
            continue  # an unknown plugin or bad options: `read` says so
        try:
            registry.create(ref.name, options).check_ready()
        except TbpwError as exc:
            problems.append(f"{'.'.join(map(str, loc))}: {exc}")
    return problems


def check_ready(recipe: Recipe) -> None:
    """Every plugin the recipe names can run with the active llama.cpp build (before any work starts)."""
    if problems := readiness_problems(recipe):
        raise Problems(problems)


def evaluator_instances(recipe: Recipe) -> list[tuple[PluginRef, Any]]:
    from tbpw.plugin.manager import get_manager

    registry = get_manager().evaluators()
    return [(ref, registry.create(ref.name, ref.options)) for ref in recipe.evaluators or []]


def _check_files(clean: dict, found: Findings) -> None:
    model = clean.get("model")
    if not isinstance(model, dict):
        return
    for key, want in (("path", "a Hugging Face model folder"), ("gguf", "a GGUF file")):
        value = model.get(key)
        if not isinstance(value, str):
            continue
        where = ("model", key)
        target = Path(value)
        if not target.exists():
            found.add(where, f"model.{key}: {value} does not exist: fix the path")
        elif (key == "gguf") != target.is_file():
            found.add(where, f"model.{key}: {value} is not {want}: fix the path")
        elif not os.access(target, os.R_OK):
            found.add(where, f"model.{key}: {value} is not readable: fix its permissions")
    for i, ref in enumerate(clean.get("compare_files") or []):
        value = ref.get("path") if isinstance(ref, dict) else None
        if not isinstance(value, str):
            continue
        target = Path(value)
        if not target.is_file():
            what = "does not exist" if not target.exists() else "is not a GGUF file"
            found.add(("compare_files", i, "path"), f"compare_files.{i}.path: {value} {what}: fix the path")


def recipe_sha256(recipe: Recipe) -> str:
    """The sha256 of what a recipe asks for, resolved (includes, --set, defaults), wherever its output goes,
    whatever runs its stages and whatever it keeps and evaluates (none of these changes a byte of a quant)."""
    content = recipe.model_dump(mode="json", exclude={"output_dir": True, "executor": True, "keep": True,
                                                      "evaluation": {"scope"}})
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def json_schema() -> dict:
    """The recipe's JSON Schema, with each installed plugin's options schema attached by name."""
    from tbpw.plugin.manager import get_manager

    schema = Recipe.model_json_schema()
    manager = get_manager()
    schema["x-tbpw-plugins"] = {
        kind: {reg.cls.name: reg.cls.Options.model_json_schema() for reg in registry}
        for kind, registry in manager.registries.items()
    }
    return schema
