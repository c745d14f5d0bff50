"""Everything about a recipe that can be known without running it, checked before any work, all at once.

`tbpw validate` and the start of `tbpw run` call `check`: it reads the recipe (fields, plugins and their
options: `tbpw.run.recipe.read`), then checks what needs the build, the model or the disk:

- every plugin can run here (the build has the tool options it needs; dataset files exist, are readable
  and of the right kind);
- types: stock types the build's llama-quantize knows, measured candidates, calibration probes;
- constraints: patterns that compile, types that exist, and (with a GGUF model) patterns and roles that
  match a tensor of it;
- targets: no duplicates, and (with a GGUF model) each reachable with these candidates and constraints and
  none closer to another than the model's smallest type step;
- the output: a folder tbpw may write its run into (absent, empty or a tbpw run directory, writable) with
  enough free space for what the run will write, and writable caches.

Each mistake is one line; `check` raises them together (`tbpw.errors.Problems`).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from tbpw.allocate.problem import build_problem
from tbpw.errors import Problems, TbpwError
from tbpw.files import paths
from tbpw.measure import candidates as cand
from tbpw.measure.table import CandidateError, ErrorTable, TensorErrors
from tbpw.model.budget import Target, format_size, parse_size
from tbpw.model.inventory import ModelInventory
from tbpw.run.costplan import disk_needed, existing_parent
from tbpw.run.recipe import Recipe, evaluator_instances, read, readiness_problems
from tbpw.stages import model as model_stage
from tbpw.stages.rundir import ownership_problem


def check(path: Path | str, overrides: list[str] | None = None) -> Recipe:
    """The recipe, or every mistake in it and in what it asks of this machine (raised as `Problems`)."""
    recipe, problems = read(path, overrides)
    if recipe is not None:
        problems += [f"{path}: {problem}" for problem in preflight(recipe)]
    if problems:
        raise Problems(problems)
    assert recipe is not None  # a recipe without mistakes validates
    return recipe


def preflight(recipe: Recipe) -> list[str]:
    """The problems of a recipe (the valid part of one) that need the build, the model or the disk, one line each."""
    problems: list[str] = []
    stock_types = _build_problems(problems)
    problems += readiness_problems(recipe)
    types = _type_problems(recipe, stock_types)
    constraints = _constraint_problems(recipe)
    problems += types + constraints + _duplicate_targets(recipe) + _source_problems(recipe)
    inventory = _model_inventory(recipe)
    if inventory is not None:
        problems += _model_problems(recipe, inventory, sound=not constraints and not any(
            p.startswith("measure.candidates") for p in types))
        problems += _context_problems(recipe, inventory) + _compare_problems(recipe, inventory)
    problems += _text_problems(recipe)
    problems += _output_problems(recipe, inventory)
    return problems


def _build_problems(problems: list[str]) -> list[str] | None:
    """The stock types the active build's llama-quantize accepts (None when there is no usable build)."""
    from tbpw.llamacpp.build import active_build
    from tbpw.llamacpp.features import detect

    try:
        return detect(active_build()).quantize_types or None
    except TbpwError as exc:
        problems.append(str(exc))
        return None


def _type_problems(recipe: Recipe, stock_types: list[str] | None) -> list[str]:
    problems = []
    wanted = [(f"compare_stock.{i}", t) for i, t in enumerate(recipe.compare_stock)]
    wanted += [(f"targets.{i}.stock", t.stock.upper()) for i, t in enumerate(recipe.targets) if t.stock]
    for where, t in wanted:
        if t in NOT_QUANTIZATIONS:
            problems.append(f"{where}: {t} is not a quantization (llama-quantize {'copies' if t == 'COPY' else 'converts'}"
                            " the tensors): compare with a quantized type such as Q4_K_M")
        elif stock_types is not None and t not in stock_types:
            problems.append(f"{where}: {t!r} is not a type this build's llama-quantize writes: use one of "
                            f"{', '.join(x for x in stock_types if x not in NOT_QUANTIZATIONS)}")
    if recipe.measure.candidates is not None:
        try:
            cand.normalize_types(recipe.measure.candidates)
        except TbpwError as exc:
            problems.append(f"measure.candidates: {exc}")
    return problems


def _constraint_problems(recipe: Recipe) -> list[str]:
    """Patterns that do not compile and types that do not exist (the model is not needed for these)."""
    return recipe.constraints.problems()


def _duplicate_targets(recipe: Recipe) -> list[str]:
    problems = []
    seen: dict[tuple, int] = {}
    labels: dict[str, int] = {}
    for i, t in enumerate(recipe.targets):
        same = ("bpw", t.bpw) if t.bpw is not None else ("size", parse_size(t.size)) if t.size is not None \
            else ("stock", (t.stock or "").upper())
        if same in seen:
            problems.append(f"targets.{i} ({t.label}) repeats targets.{seen[same]}: each target makes its own quants; "
                            "remove one")
        elif t.label in labels:
            problems.append(f"targets.{i} ({t.label}) has the name of targets.{labels[t.label]}, whose quants its own "
                            "would overwrite: targets this close are one target; remove one")
        else:
            seen[same], labels[t.label] = i, i
    return problems


# Stock "types" llama-quantize accepts that quantize nothing: no comparison at their size makes sense.
NOT_QUANTIZATIONS = ("F32", "F16", "BF16", "COPY")
# llama-perplexity and llama-imatrix refuse a text of fewer tokens than twice their context; a token is at least
# one byte of text, so fewer bytes than this many contexts is surely too short.
MIN_CONTEXTS_OF_TEXT = 2


def _contexts(recipe: Recipe) -> list[tuple[str, int, str]]:
    """(field, tokens of context, the dataset role its text comes from) of every tool run a recipe sets."""
    found = [("imatrix.ctx", recipe.imatrix.ctx, "calibration"), ("evaluation.ctx", recipe.evaluation.ctx, "evaluation")]
    if recipe.calibrate is not None:
        found.append(("calibrate.ctx", recipe.calibrate.ctx, "calibration"))
    if recipe.choose is not None:
        found.append(("choose.ctx", recipe.choose.ctx, "calibration"))
    return found


def _context_problems(recipe: Recipe, inventory: ModelInventory) -> list[str]:
    """Contexts the model was not trained for (llama.cpp sizes its buffers by them: a huge one fails to load after
    the stages before it ran)."""
    trained = inventory.metadata(f"{inventory.architecture}.context_length")
    if not isinstance(trained, int) or trained <= 0:
        return []
    fields = [(field, ctx) for field, ctx, _ in _contexts(recipe)]
    if _runs_tasks(recipe):  # task benchmarks run at their own context
        fields.append(("evaluation.task_ctx", recipe.evaluation.task_ctx))
    return [f"{field}: {ctx} tokens is more than the {trained} the model was trained for: give at most {trained}"
            for field, ctx in fields if ctx > trained]


def _runs_tasks(recipe: Recipe) -> bool:
    try:
        return any(e.dataset_roles() for _, e in evaluator_instances(recipe))
    except TbpwError:
        return False  # an evaluator that cannot be made: its own check says so


def _text_problems(recipe: Recipe) -> list[str]:
    """Texts shorter than the runs that read them need (checked on the texts that are here: local files, cached
    downloads; a text that needs a download is checked once it is fetched)."""
    from tbpw.data.files import DatasetContext
    from tbpw.plugin.manager import get_manager

    registry = get_manager().datasets()
    context = DatasetContext(cache_dir=paths.assets(), offline=True, resolve=registry.create)
    sizes: dict[str, int | None] = {}
    problems = []
    for field, ctx, role in _contexts(recipe):
        if role not in sizes:
            ref = recipe.datasets[role]
            try:
                made = registry.create(ref.name, ref.options).materialize(context)
                sizes[role] = Path(made.path).stat().st_size if made.kind == "text" else None
            except (TbpwError, OSError):
                sizes[role] = None  # not here yet, or not text: its own checks speak for it
        size = sizes[role]
        if size is not None and size < MIN_CONTEXTS_OF_TEXT * ctx:
            problems.append(f"{field}: the {role} text has {size} bytes, fewer than the {MIN_CONTEXTS_OF_TEXT * ctx} "
                            f"tokens two contexts of {ctx} need: give more text or a smaller {field}")
    return problems


def _source_problems(recipe: Recipe) -> list[str]:
    """What the model stage would stop at before converting or downloading anything."""
    import importlib.util

    from tbpw.llamacpp import convert

    src = recipe.model
    no_hub = importlib.util.find_spec("huggingface_hub") is None
    if src.hub is not None and no_hub:
        return ["model.hub needs huggingface_hub: pip install 'tbpw[hub]'"]
    if no_hub and (hubs := [i for i, ref in enumerate(recipe.compare_files) if ref.hub is not None]):
        return [f"compare_files.{hubs[0]}: a hub file needs huggingface_hub: pip install 'tbpw[hub]'"]
    if src.path is not None:
        if Path(src.path).is_dir() and not (Path(src.path) / "config.json").is_file():
            return [f"model.path: {src.path} is not a Hugging Face model folder (no config.json): give the folder "
                    "holding config.json and the weights"]
        if missing := convert.missing_modules():
            return [f"model.path: converting a Hugging Face model needs {', '.join(missing)}: pip install 'tbpw[convert]'"]
    return []


def _model_inventory(recipe: Recipe) -> ModelInventory | None:
    """The model's tensors when they can be known before the run: a GGUF source (None otherwise)."""
    if recipe.model.gguf is None:
        return None
    try:
        return ModelInventory.load(recipe.model.gguf)
    except TbpwError:
        return None  # reported by the file checks, or by the model stage with its own message


def _zero_table(inventory: ModelInventory, types: Iterable[str] | None) -> ErrorTable:
    """Every quantizable tensor with every candidate type (IQ types included) at no error: what bounds the
    sizes a plan can have, before anything is measured."""
    tensors = []
    for info in inventory.tensors:
        if info.quantizable:
            found = cand.for_tensor(info, list(types) if types is not None else None, has_imatrix=True)
            tensors.append(TensorErrors(info.name, info.n_elements,
                                        [CandidateError(t, info.bytes_as(t), 0.0) for t in found]))
    return ErrorTable(tensors)


def _model_problems(recipe: Recipe, inventory: ModelInventory, *, sound: bool) -> list[str]:
    """Constraints that match nothing in the model, unreachable and near-duplicate targets (`sound`: the
    constraints and candidates themselves are valid, so that sizes can be worked out)."""
    if not sound:
        return []
    c = recipe.constraints
    problems = c.model_problems(inventory)
    if problems:
        return problems
    table = _zero_table(inventory, recipe.measure.candidates)
    for i, target in enumerate(recipe.targets):
        if target.stock:
            continue  # its size is the stock file's, known once that is written
        try:
            build_problem(inventory, table, Target.parse(bpw=target.bpw, size=target.size), c)
        except TbpwError as exc:
            problems.append(f"targets.{i} ({target.label}): {exc}")
    problems += _near_duplicate_targets(recipe, inventory, table)
    return problems


def _compare_problems(recipe: Recipe, inventory: ModelInventory) -> list[str]:
    """Local `compare_files` that are not quants of the model (a hub file is checked once it is fetched)."""
    from tbpw.stages import compare

    problems = []
    for i, ref in enumerate(recipe.compare_files):
        if ref.path is None or not Path(ref.path).is_file():
            continue  # a missing path is the recipe check's to report
        try:
            compare.check_same_model(inventory, ModelInventory.load(ref.path), f"compare_files.{i}")
        except TbpwError as exc:
            problems.append(str(exc))
    return problems


def _near_duplicate_targets(recipe: Recipe, inventory: ModelInventory, table: ErrorTable) -> list[str]:
    """Targets closer to each other than the model's smallest step between two types of one tensor."""
    steps = [b - a for t in table.tensors for a, b in zip(sorted({c.bytes for c in t.candidates}),
                                                          sorted({c.bytes for c in t.candidates})[1:])]
    if not steps:
        return []
    step = min(steps)
    budgets = []
    for i, t in enumerate(recipe.targets):
        if t.bpw is not None:
            budgets.append((i, t.label, "bpw", math.floor(t.bpw * inventory.n_elements / 8)))
        elif t.size is not None:
            budgets.append((i, t.label, "size", parse_size(t.size)))
    problems = []
    for k, (i, label, kind, budget) in enumerate(budgets):
        for j, other, other_kind, other_budget in budgets[:k]:
            if kind == other_kind and 0 < abs(budget - other_budget) < step:
                problems.append(f"targets.{i} ({label}) is {abs(budget - other_budget)} bytes from targets.{j} ({other}), "
                                f"less than this model's smallest type step ({step} bytes): the two plans can differ by "
                                "at most one step; remove one or move it further")
                break
    return problems


def _output_problems(recipe: Recipe, inventory: ModelInventory | None) -> list[str]:
    if recipe.output_dir is None:
        return []  # no folder to check without a valid name
    out = Path(recipe.output_dir)
    if problem := ownership_problem(out):
        return [problem]
    problems = []
    for what, folder in (("the measurement cache", paths.measure_cache()), ("the asset cache", paths.assets())):
        if not _creatable(folder):
            problems.append(f"{what} {folder} is not writable: set TBPW_HOME (or TBPW_MEASURE_CACHE) to a writable "
                            "folder")
    size = model_stage.size(recipe.model, inventory)
    if size is not None:
        try:
            needed = disk_needed(recipe, size)
        except TbpwError:  # a recipe whose stages cannot be laid out (an unknown plugin, two targets alike): its
            return problems  # mistake is reported by its own check, and the disk is checked once it is mended
        need = max(0, needed - _bytes_in(out))
        free = shutil.disk_usage(existing_parent(out)).free
        if need > free:
            problems.append(f"output_dir {out}: the run writes at least {format_size(need)} more, and its disk has "
                            f"{format_size(free)} free: free space or choose another output_dir")
    return problems


def _creatable(folder: Path) -> bool:
    found = existing_parent(folder)
    return found.is_dir() and os.access(found, os.W_OK | os.X_OK)


def _bytes_in(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
