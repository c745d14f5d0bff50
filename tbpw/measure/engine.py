"""The error table: for every quantizable tensor and candidate type, exact bytes and a measured error.

Sampled rows of each tensor (of each expert) are quantized and dequantized through libggml (the code
llama-quantize runs, with the imatrix's E[a^2] as importance) and scored by an error-metric plugin.
Bytes come from the inventory (stock fallbacks applied), never from nominal bpw.

The table is cached under $TBPW_HOME/measure/<key>/, the key covering everything it depends on:
the model (the sha256 of the whole file, every weight included), the imatrix content, the metric and its
options, the sampling, the candidate set, the llama.cpp build. Finished tensors are appended to
`partial.jsonl` as they complete (one whole line each, flushed), so Ctrl-C / SIGTERM loses at most the
tensors in flight and the next run resumes; the finished table is written atomically to `table.json`.
One process measures an entry at a time (`.lock`): a second one waits and then takes the finished table.
A cached table that does not parse or does not match the model is discarded and measured again.

    table = measure("model.gguf", "model.imatrix.gguf", metric)  # metric: an error-metric plugin instance
    for t in table.tensors: print(t.name, [(c.type, c.bytes, c.error) for c in t.candidates])
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tbpw.errors import Interrupted, TbpwError, os_error, sigterm_as_interrupt
from tbpw.files import paths, sealed
from tbpw.files.atomic import sweep_folder, write_json
from tbpw.files.lock import waiting_lock
from tbpw.imatrix.reader import Imatrix
from tbpw.llamacpp import resources
from tbpw.measure import candidates as cand
from tbpw.measure.cache import cached_table, note, partial_line, read_partial
from tbpw.measure.options import MeasureOptions, SamplingOptions
from tbpw.measure.sampling import rows_per_slice, sample_rows
from tbpw.measure.slices import ColumnStats, MeasureSetup, MetricContext, MetricPlugin, TensorSample
from tbpw.measure.table import CandidateError, ErrorTable, TensorErrors
from tbpw.model.ggml_types import nominal_bpw
from tbpw.model.inventory import ModelInventory, TensorInfo
from tbpw.model.inventory import fingerprint as model_fingerprint

if TYPE_CHECKING:
    from rich.progress import Progress

    from tbpw.quantize.store import BlobWriter, StoreSource

# Bump when a change to this module changes the numbers it produces.
ENGINE_VERSION = 1



@dataclass(frozen=True)
class SlicePlan:
    expert: int | None  # None for a 2-D tensor
    rows: np.ndarray  # row indices within the slice


def plan_tensor(info: TensorInfo, has_mean: bool, sampling: SamplingOptions | None = None) -> list[SlicePlan]:
    """The rows measured of each slice (expert) of a tensor: each expert is sampled on its own."""
    count = rows_per_slice(info.row_length, info.rows_per_expert, info.n_experts, has_mean, sampling)
    if not info.is_expert:
        return [SlicePlan(None, sample_rows(info.name, 0, info.rows_per_expert, count))]
    return [SlicePlan(e, sample_rows(info.name, e, info.rows_per_expert, count)) for e in range(info.n_experts)]


def cache_key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class MeasurementInterrupted(Interrupted):
    """Ctrl-C or SIGTERM stopped a measurement; the finished tensors are saved and the next run resumes."""


def measure(model_path: Path | str, imatrix_path: Path | str | None, metric: MetricPlugin,
            options: MeasureOptions | None = None, *, cache_dir: Path | str | None = None, progress: bool = True,
            tensors: Iterable[str] | None = None, on_tensor: Callable[[TensorErrors], None] | None = None,
            store: StoreSource | None = None) -> ErrorTable:
    """Measure (or load from the cache) the error table of a model.

    `metric` is the error-metric plugin instance that scores the rows (the caller makes it from
    `options.metric`, or the registry's default); `options` gives the candidate types (default: the fork's 20),
    the row sampling (default: the fork's) and the threads. `tensors` limits the measurement to some tensors
    (default: every quantizable one). `on_tensor` is called (in the calling thread) with each tensor as it
    finishes. With `store` (tbpw.quantize.store, bound to this model and imatrix), a tensor whose every row is
    measured leaves its quantized data there for each candidate type: exactly the bytes llama-quantize writes,
    so plans need no quantization of it later.
    """
    from tbpw.llamacpp.build import active_build

    options = options or MeasureOptions()
    if options.metric is not None and options.metric.name != metric.name:
        raise TbpwError(f"the options name the metric {options.metric.name!r}, the instance is {metric.name!r}: "
                        "measure with the metric the options name")
    inventory = ModelInventory.load(model_path)
    imatrix = Imatrix.load(imatrix_path) if imatrix_path is not None else None
    match = imatrix.check_against(inventory) if imatrix is not None else None
    candidate_set = cand.normalize_types(options.candidates)
    names = _select(inventory, tensors)
    build = active_build()
    if store is not None and (store.inventory.path.resolve() != inventory.path.resolve() or
                              (store.imatrix_path.resolve() if store.imatrix_path is not None else None) !=
                              (Path(imatrix_path).resolve() if imatrix_path is not None else None)):
        raise TbpwError("the tensor store was opened for another model or imatrix than the measurement's")

    parts = {
        "engine": ENGINE_VERSION,
        "model": model_fingerprint(inventory),
        "imatrix": imatrix.content_hash() if imatrix is not None else None,
        "metric": metric.name,
        "metric_options": metric.options.model_dump(mode="json"),
        "sampling": options.sampling.model_dump(mode="json"),
        "candidates": list(candidate_set),
        "tensors": names,
        "build": {"key": build.key, "number": build.build_number, "commit": build.build_commit, "backend": build.backend},
    }
    key = cache_key(parts)
    folder = Path(cache_dir) if cache_dir is not None else paths.measure_cache()
    folder = folder / key
    meta = {**parts, "key": key, "model_path": str(inventory.path), "model_sha256": parts["model"],
            "imatrix_path": str(imatrix.path) if imatrix is not None else None,
            "imatrix_missing": match.missing if match is not None else None}

    final = folder / "table.json"
    if (cached := cached_table(final, inventory, names)) is not None:
        return cached
    with waiting_lock(folder / ".lock", note=note):
        # whoever held the lock may have finished this very table
        if (cached := cached_table(final, inventory, names)) is not None:
            return cached
        sweep_folder(folder)  # what a measurement that was killed left half-written
        from tbpw.llamacpp import ggml as ggml_bridge

        engine = _Engine(inventory, imatrix, metric, ggml_bridge.load(build.library("ggml-base")), candidate_set,
                         options.sampling, store)
        return _measure_entry(folder, meta, engine, names, options.threads, progress, on_tensor)


def _measure_entry(folder: Path, meta: dict, engine: _Engine, names: list[str], threads: int | None,
                   progress: bool, on_tensor: Callable[[TensorErrors], None] | None) -> ErrorTable:
    final = folder / "table.json"
    write_json(folder / "meta.json", meta)
    partial = folder / "partial.jsonl"
    done = read_partial(partial, engine.inventory, names, lambda n: engine.candidates(engine.inventory[n]))

    engine.metric.setup(MeasureSetup(inventory=engine.inventory, imatrix=engine.imatrix, tensors=tuple(names)))
    todo = [n for n in names if n not in done]
    # Longest jobs first, so one big tensor does not finish alone at the end.
    todo.sort(key=lambda n: -engine.cost(n))
    start = time.monotonic()
    results = dict(done)
    try:
        with _Progress(progress, total=sum(engine.cost(n) for n in names), done=sum(engine.cost(n) for n in done),
                       n_tensors=len(names), n_done=len(done)) as bar, sigterm_as_interrupt():
            for result in engine.run(todo, resources.threads(threads) or os.cpu_count() or 1):
                _append_partial(partial, result)
                results[result.name] = result
                bar.advance(engine.cost(result.name), result.name)
                if on_tensor is not None:
                    on_tensor(result)
    except KeyboardInterrupt as exc:
        raise MeasurementInterrupted(f"measurement interrupted: {len(results)} of {len(names)} tensors are saved in "
                                     f"{folder}; run the same command again to resume", cause=exc) from None
    table = ErrorTable([results[n] for n in names], dict(meta, seconds=round(time.monotonic() - start, 3),
                                                         resumed_tensors=len(done)))
    table.write_json(final)
    sealed.write_seal(final)
    partial.unlink(missing_ok=True)
    table.meta["cached"] = False
    return table


def _select(inventory: ModelInventory, tensors: Iterable[str] | None) -> list[str]:
    decidable = [t.name for t in inventory.tensors if t.quantizable and len(t.shape) in (2, 3)]
    if tensors is None:
        return decidable
    wanted = list(dict.fromkeys(tensors))
    unknown = [n for n in wanted if n not in decidable]
    if unknown:
        raise TbpwError(f"{unknown[0]} is not a quantizable tensor of {inventory.path.name}")
    return [n for n in decidable if n in set(wanted)]


class _Engine:
    def __init__(self, inventory: ModelInventory, imatrix: Imatrix | None, metric: MetricPlugin, lib, types: Sequence[str],
                 sampling: SamplingOptions, store: StoreSource | None = None):
        self.inventory = inventory
        self.imatrix = imatrix
        self.metric = metric
        self.lib = lib
        self.types = types
        self.sampling = sampling
        self.has_mean = bool(imatrix is not None and imatrix.has_means)
        self.stop = threading.Event()
        self._cost: dict[str, float] = {}
        self.store = store

    def candidates(self, info: TensorInfo) -> list[str]:
        has_data = self.imatrix is not None and info.name in self.imatrix
        return cand.for_tensor(info, self.types, has_imatrix=has_data)

    def cost(self, name: str) -> float:
        if name not in self._cost:
            info = self.inventory[name]
            rows = rows_per_slice(info.row_length, info.rows_per_expert, info.n_experts, self.has_mean, self.sampling)
            self._cost[name] = float(rows * info.n_experts * info.row_length * max(1, len(self.candidates(info))))
        return self._cost[name]

    def run(self, names: Sequence[str], threads: int) -> Iterator[TensorErrors]:
        """Measure `names` on `threads` threads, yielding each tensor as it finishes (in the calling thread).

        libggml builds the grids of the very-low-bit IQ types on first use, under a lock no other quantization
        can pass through (GRID_TYPES). So each tensor is measured in two parts: first every tensor's types without
        a grid, while one thread builds the grids; then the grid types. The cores stay busy meanwhile."""
        if not names:
            return
        grids = [t for t in self.types if self.lib.needs_grid(t)]
        if grids:
            threading.Thread(target=self.lib.prepare, args=(grids,), name="tbpw-grids", daemon=True).start()
        jobs: list[tuple[str, bool]] = []  # (tensor, its grid types?)
        self._parts: dict[str, list] = {}
        for name in names:
            types = self.candidates(self.inventory[name])
            split = [flag for flag in (False, True) if any((t in grids) == flag for t in types)]
            self._parts[name] = [len(split), np.zeros(len(types)), threading.Lock()]
            jobs += [(name, flag) for flag in split]
        jobs.sort(key=lambda job: job[1])  # every tensor's first part before any grid part (stable: largest first)
        pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="tbpw-measure")
        pending: set[Future] = set()
        try:
            while jobs or pending:
                while jobs and len(pending) < 2 * max(1, threads):
                    name, grid_part = jobs.pop(0)
                    pending.add(pool.submit(self.tensor, name, frozenset(grids) if grid_part else None,
                                            frozenset(grids)))
                # A timeout, so that an interrupt sent to this thread (a worker of tbpw.run.execute) lands soon.
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in finished:
                    result = fut.result()
                    if result is not None:
                        yield result
        finally:
            self.stop.set()
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True)

    def tensor(self, name: str, only: frozenset[str] | None = None,
               skip: frozenset[str] = frozenset()) -> TensorErrors | None:
        """Measure the candidate types of `name` that are in `only` (None: those not in `skip`); the part that
        finishes a tensor returns its errors (parts: see `run`), the others None."""
        info = self.inventory[name]
        types = self.candidates(info)
        mine = [k for k, t in enumerate(types) if (t in only if only is not None else t not in skip)]
        plan = plan_tensor(info, self.has_mean, self.sampling)
        imatrix = self.imatrix if self.imatrix is not None and name in self.imatrix else None
        importance = imatrix.importance(name) if imatrix is not None else None
        means = imatrix.mean(name) if imatrix is not None else None
        sums = np.zeros(len(types))
        blobs = self._blobs(info, plan, [types[k] for k in mine])
        try:
            for sl in plan:
                e = sl.expert or 0
                rows = self._rows(info, sl)
                imp = importance[e] if importance is not None else None
                stats = ColumnStats(sq=imp, mean=means[e] if means is not None else None)
                for k in mine:
                    t = types[k]
                    if self.stop.is_set():
                        return None
                    ctx = MetricContext(tensor=name, role=info.role, type=t, nominal_bpw=nominal_bpw(t),
                                        slice_rows=info.rows_per_expert, expert=sl.expert)
                    prepared = self.metric.prepare_rows(rows, ctx)
                    quantized = self.lib.quantize(t, prepared, imp)
                    if t in blobs:
                        if prepared is rows:  # the stored rows as llama-quantize reads them: its very bytes
                            blobs[t].write(quantized)
                        else:
                            blobs.pop(t).discard()
                    reconstructed = self.lib.dequantize(t, quantized, info.row_length)
                    sums[k] += float(self.metric.slice_error(rows, reconstructed, stats, ctx))
            for blob in blobs.values():
                blob.commit()
        finally:
            for blob in blobs.values():
                blob.discard()
        parts = getattr(self, "_parts", {}).get(name)
        if parts is not None:
            with parts[2]:
                parts[1] += sums
                parts[0] -= 1
                if parts[0] > 0:
                    return None
                sums = parts[1]
        # the sampled rows are read again (and only) if the metric's per-tensor pass asks for them
        sample = TensorSample(tensor=name, role=info.role, n_cols=info.row_length,
                              n_rows=sum(len(sl.rows) for sl in plan),
                              blocks=lambda: (self._rows(info, sl) for sl in plan))
        ctx = MetricContext(tensor=name, role=info.role, type=info.stored_type,
                            nominal_bpw=nominal_bpw(info.stored_type), slice_rows=info.rows_per_expert)
        factor = float(self.metric.tensor_factor(sample, ctx))
        return TensorErrors(name, info.n_elements,
                            [CandidateError(t, info.bytes_as(t), float(sums[k] * factor)) for k, t in enumerate(types)])

    def _blobs(self, info: TensorInfo, plan: list[SlicePlan], types: Sequence[str]) -> dict[str, BlobWriter]:
        """Store blobs to fill while measuring: when every row of every slice is measured, in order."""
        if self.store is None or any(len(sl.rows) != info.rows_per_expert for sl in plan):
            return {}
        out = {}
        for t in types:
            if self.store.supports(t) and t != info.stored_type and not self.store.has(info.name, t):
                try:
                    out[t] = self.store.open_blob(info.name, t)
                except TbpwError:  # a type llama-quantize would refuse here: nothing to keep
                    continue
        return out

    def _rows(self, info: TensorInfo, sl: SlicePlan) -> np.ndarray:
        # picked by an index array, the rows are a copy, never a view of the mapping
        rows = np.ascontiguousarray(self.inventory.rows(info.name, sl.rows, expert=sl.expert), dtype=np.float32)
        self.inventory.release(info.name)  # sampled rows touch most pages of a tensor: give them back at once
        return rows


def _append_partial(path: Path, result: TensorErrors) -> None:
    line = partial_line(result)
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise os_error(exc, "write", path) from None


class _Progress:
    def __init__(self, enabled: bool, total: float, done: float, n_tensors: int, n_done: int):
        self.enabled = enabled
        self.total, self.done, self.n_tensors, self.n_done = total, done, n_tensors, n_done
        self._bar: Progress | None = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("measuring"), BarColumn(), TextColumn("{task.fields[count]}"),
                                 TextColumn("{task.fields[current]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
            self._bar.__enter__()
            # rich annotates add_task's `completed` as int, but keeps it as a float (Task.completed)
            self._task = self._bar.add_task("measure", total=max(self.total, 1.0),
                                            completed=self.done,  # type: ignore[arg-type]
                                            count=f"{self.n_done}/{self.n_tensors} tensors", current="")
        return self

    def advance(self, amount: float, name: str) -> None:
        self.n_done += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=amount, count=f"{self.n_done}/{self.n_tensors} tensors", current=name)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

