"""What a run will cost, before it starts: its stages (to run, or finished earlier), its tool runs, disk and time.

`tbpw run RECIPE --plan` prints it and stops; every `tbpw run` prints its summary first. Nothing here runs a
tool or writes a file. The parts:

- the model's size, from what the recipe names without converting or downloading: a GGUF's tensor table, a
  Hugging Face folder's safetensors headers (a hub model only when it is in the local hub cache);
- the stages: the pipeline's own task graph, each marked `reuse?` when an earlier run finished it (it is
  skipped if its inputs are unchanged), `run`, or `as is` (a float GGUF model, used without a copy);
- the counts: llama-quantize runs (stock types, plans, calibration probes, choice candidates), KLD runs on
  calibration text (calibration probes, plan screening and finals), evaluation runs (quants x evaluators) and
  llama-bench runs, each at most what the recipe allows;
- the disk: what the run directory holds at the end plus the largest file in flight (`disk_needed`, which the
  preflight check refuses a run by);
- the time, from two rates measured here and now: libggml quantizing Q4_K rows on one thread (times the
  threads) prices a quantization of the model, a float32 matrix product prices a forward pass at 2 FLOP per
  active weight and token. It is a rough estimate for a CPU build (each plan counted as one llama-quantize run,
  though a run with the tensor store assembles most of them), printed with its basis and what it leaves out.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tbpw.allocate.budget import format_size, parse_size
from tbpw.model.ggml_types import FLOAT_TYPES, nominal_bpw, type_name

if TYPE_CHECKING:
    from tbpw.model.inventory import ModelInventory
    from tbpw.run.pipeline import Pipeline
    from tbpw.run.recipe import Recipe

MIN_STOCK_BPW = 1.5  # a lower bound of any stock type's size
MEASURE_IN_QUANTIZATIONS = 2.5  # `tbpw measure` of a 26B-A4B layout: 2.4 plain quantizations (docs/scale.md)
ASSUMED_ROLES = 10  # calibration groups when grouping by role and the model's roles are not known yet


@dataclass(frozen=True)
class ModelSize:
    """The float model as far as it is known before the run: weights, weights a token uses, vocabulary."""

    n_elements: int
    n_active: int  # weights one token multiplies (mixture of experts: the routed experts only)
    vocab: int
    stored_bytes: int  # the source's tensor bytes
    needs_copy: bool  # the run writes a float GGUF of it (converted or requantized)
    source: str  # where the numbers come from
    roles: int = ASSUMED_ROLES
    tensors: int = 0  # quantizable tensors (0: unknown)


def model_size(recipe: Recipe, inventory: ModelInventory | None = None) -> ModelSize | None:
    """The size of the recipe's model without converting or downloading it (None: not known yet)."""
    src = recipe.model
    if src.gguf is not None:
        if inventory is None:
            from tbpw.errors import TbpwError
            from tbpw.model.inventory import ModelInventory

            try:
                inventory = ModelInventory.load(src.gguf)
            except TbpwError:
                return None
        return _from_inventory(inventory, src.outtype)
    if src.path is not None:
        return _from_folder(Path(src.path))
    if src.hub is not None:
        folder = _hub_cache(src.hub, src.revision)
        return _from_folder(folder) if folder is not None else None
    return None


def _from_inventory(inventory: ModelInventory, outtype: str) -> ModelSize:
    used = inventory.metadata(f"{inventory.architecture}.expert_used_count")
    count = inventory.metadata(f"{inventory.architecture}.expert_count")
    share = used / count if isinstance(used, int) and isinstance(count, int) and count > 0 else 1.0
    experts = sum(t.n_elements for t in inventory.tensors if t.is_expert)
    stored = {t.stored_type for t in inventory.tensors}
    embd = next((t for t in inventory.tensors if t.name == "token_embd.weight"), None)
    quantizable = [t for t in inventory.tensors if t.quantizable]
    return ModelSize(n_elements=inventory.n_elements, n_active=int(inventory.n_elements - experts * (1 - share)),
                     vocab=embd.shape[1] if embd is not None and len(embd.shape) > 1 else 0,
                     stored_bytes=inventory.tensor_bytes(),
                     needs_copy=not (stored <= FLOAT_TYPES and (outtype.upper() in stored or stored <= {"F32"})),
                     source=f"the tensor table of {inventory.path.name}",
                     roles=len({t.role for t in quantizable}) or ASSUMED_ROLES, tensors=len(quantizable))


def _from_folder(folder: Path) -> ModelSize | None:
    """Weights counted from the safetensors headers (a few kB each), experts and vocabulary from config.json."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    n = experts = stored = 0
    for file in files:
        try:
            with open(file, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
        except (OSError, ValueError, struct.error):
            return None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            size = math.prod(info["shape"])
            n += size
            stored += info["data_offsets"][1] - info["data_offsets"][0]
            if ".experts." in name or name.endswith(".experts"):
                experts += size
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    text = config.get("text_config") or config
    count = text.get("num_experts") or text.get("num_local_experts") or 0
    used = text.get("top_k_experts") or text.get("num_experts_per_tok") or count
    share = used / count if count else 1.0
    return ModelSize(n_elements=n, n_active=int(n - experts * (1 - share)), vocab=int(text.get("vocab_size") or 0),
                     stored_bytes=stored, needs_copy=True, source=f"the safetensors headers in {folder}")


def _hub_cache(repo: str, revision: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo, revision=revision, local_files_only=True))
    except Exception:  # not installed, not cached: the size is not known before the download
        return None


# ------------------------------------------------------------------------------------------------ disk

def disk_needed(recipe: Recipe, size: ModelSize) -> int:
    """What the run directory holds at its end, plus the largest file made on the way (a choice candidate) and,
    with `keep: chosen`, a target's plans before the ones not kept are deleted."""
    n = size.n_elements
    total = 2 * n if size.needs_copy else 0  # the F16/BF16 GGUF of a converted or requantized source
    allocator_quants = len(recipe.allocators or [None]) if recipe.writes_allocator_quants() else 0
    plans_per_target = allocator_quants + (1 if recipe.choose is not None else 0)
    kept_per_target = 1 if recipe.keep == "chosen" else plans_per_target
    largest = 0
    for t in recipe.targets:
        quant = int(t.bpw * n / 8 if t.bpw is not None else parse_size(t.size) if t.size is not None
                    else stock_bpw(t.stock or "") * n / 8)
        total += quant * kept_per_target
        largest = max(largest, quant)
    total += largest * (plans_per_target - kept_per_target)
    for stock in {*recipe.compare_stock, *(t.stock.upper() for t in recipe.targets if t.stock)}:
        total += int(stock_bpw(stock) * n / 8)
    ev = recipe.evaluation
    if ev.chunks is not None and size.vocab:
        total += ev.chunks * (ev.ctx // 2) * size.vocab * 2  # llama-perplexity keeps the second half of each chunk
    in_flight = largest if recipe.choose is not None or recipe.calibrate is not None else 0
    return total + in_flight


def stock_bpw(name: str) -> float:
    """The nominal bpw of a stock type's main ggml type (Q4_K_M -> Q4_K: 4.5), a lower bound of its size."""
    for base in (name.upper(), re.sub(r"_(?:XXS|XS|S|M|L|XL)$", "", name.upper())):
        try:
            return nominal_bpw(type_name(base))
        except (KeyError, ValueError):
            continue
    return MIN_STOCK_BPW


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
    forced = pipeline.force
    size = model_size(recipe)
    graph = pipeline.graph()  # the deletions of `keep: chosen` are no stages
    stages = [(t.name, "reuse?" if (root / t.name / "manifest.json").is_file() and not (
        t.name in forced or any(t.name.startswith(f"{f}-") for f in forced)) else "run")
        for t in graph if t.name not in pipeline.releases]
    if size is not None and not size.needs_copy:  # a float GGUF is used as it is: its task makes nothing
        stages = [(name, "as is" if name == "model" else status) for name, status in stages]
    names = [name for name, _ in stages]
    todo = {name for name, status in stages if status == "run"}
    probes = candidates = 0
    if recipe.calibrate is not None:
        groups = (size.tensors if size and size.tensors and recipe.calibrate.grouping == "tensor"
                  else size.roles if size else ASSUMED_ROLES)
        # each group at each probe type, and the floor (the background alone) unless that is the float model
        probes = groups * len(recipe.calibrate.probes) + (recipe.calibrate.background != "float")
    choose = recipe.choose
    finals = later_rounds = 0
    if choose is not None:
        tables = (len(recipe.calibrate.strengths) if recipe.calibrate is not None and choose.tables == "calibrated"
                  else 1 + (len(recipe.calibrate.strengths) if recipe.calibrate is not None else 0))
        candidates = tables * len(recipe.allocators or [None]) + choose.refine_rounds * choose.refine_tries
        finals = min(choose.finalists, candidates) if choose.screen_chunks else 0
        # at most: the finalists go on through every later round (a run per round); a lone candidate is scored
        # once, on all the chunks
        screened = choose.screen_chunks and candidates > 1
        later_rounds = -(-choose.chunks // choose.screen_chunks) - 1 if screened else 0

    evaluators = {part: len(pipeline.evaluators_for(part)) for part in ("all", "select", "tasks")}
    conditional = pipeline.conditional  # task -> target: it runs for the target's selected quant alone
    split = pipeline.splits_evaluation()

    def runs(among: set[str] | list[str], prefix: str) -> int:
        """How many of the tasks `among` named `prefix`... will run (those of a target's selected quant: once)."""
        named = [n for n in among if n.startswith(prefix)]
        return sum(1 for n in named if n not in conditional) + len({conditional[n] for n in named if n in conditional})

    def counts(among: set[str] | list[str]) -> tuple[int, int, int, int]:
        """(quantizations, calibration KLD runs, evaluation runs, bench runs) of the stages `among`."""
        plans = sum(1 for n in among if n.startswith(("stock-", "quant-")) and not n.endswith("-choose"))
        chosen = sum(1 for n in among if n.startswith("quant-") and n.endswith("-choose"))
        calibrating = probes if "calibrate" in among else 0
        tasks = [n for n in among if n.startswith("eval-") and n.endswith("+tasks")]
        whole = [n for n in among if n.startswith("eval-") and n not in tasks]
        evaluations = len(whole) * evaluators["select" if split else "all"] + runs(tasks, "eval-") * evaluators["tasks"]
        return (plans + calibrating + chosen * candidates, calibrating + chosen * (candidates + finals * later_rounds),
                evaluations,
                runs(among, "bench-"))

    disk = disk_needed(recipe, size) if size is not None else None
    free = shutil.disk_usage(existing_parent(root)).free
    plan = CostPlan(stages, *counts(names), disk, free, None, size,
                    klds_at_most=later_rounds > 0 and any(n.endswith("-choose") for n in names))
    rates = rates or measure_rates(recipe.measure.threads)
    if size is None or rates is None:
        if rates is None and size is not None:
            plan.uncounted.append("time: no llama.cpp build to measure this machine's rates with")
        return plan
    quantizations, _, evaluations, benches = counts(todo)
    per_quant = size.n_elements / (rates.quantize * rates.threads)
    per_token = 2.0 * size.n_active / rates.flops
    seconds = per_quant * (quantizations + (MEASURE_IN_QUANTIZATIONS if "measure" in todo else 0))
    ev, imx = recipe.evaluation, recipe.imatrix
    tokens = 0
    if ev.chunks is not None:
        tokens += ev.ctx * ev.chunks * (("baseline" in todo) + evaluations)  # the float logits, each evaluation
    elif "baseline" in todo or evaluations:
        plan.uncounted.append("the baseline and the evaluation runs: evaluation.chunks is not set (the whole text)")
    if imx.chunks is not None:
        tokens += imx.ctx * imx.chunks * ("imatrix" in todo)
    elif "imatrix" in todo:
        plan.uncounted.append("the imatrix: imatrix.chunks is not set (the whole calibration text)")
    if recipe.calibrate is not None and "calibrate" in todo:
        tokens += recipe.calibrate.ctx * recipe.calibrate.chunks * (probes + 1)
    if choose is not None:
        chosen = sum(1 for n in todo if n.startswith("quant-") and n.endswith("-choose"))
        # at most: every candidate on the first round, the finalists on the remaining chunks
        rest = choose.chunks - choose.screen_chunks if choose.screen_chunks else 0
        tokens += choose.ctx * chosen * (candidates * (choose.screen_chunks or choose.chunks) + finals * rest)
    if recipe.bench.enabled:
        b = recipe.bench
        tokens += benches * b.repetitions * (b.pp + b.tg + sum(b.pg or []))
    seconds += tokens * per_token
    plan.seconds = seconds
    plan.basis = [
        f"one quantization of the model ~{_duration(per_quant)}: libggml quantizes {rates.quantize / 1e6:.1f} M "
        f"weights/s to Q4_K on one thread here, x {rates.threads} threads (IQ types are 2-4x slower)",
        f"the measurement ~{MEASURE_IN_QUANTIZATIONS:g} quantizations (docs/scale.md)",
        f"one token through the model ~{per_token * 1e3:.1f} ms: 2 FLOP per active weight at {rates.flops / 1e9:.0f} "
        f"GFLOP/s (a float32 matrix product here; a GPU build runs far faster); {tokens / 1e6:.2f} M tokens counted",
    ]
    plan.uncounted.append("task evaluators' tasks beyond one pass over the evaluation chunks; downloads; conversion")
    return plan

