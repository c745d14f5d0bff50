"""The one path from an error table to a written model: problem -> allocator plugin -> plan -> llama-quantize.

`Planner` is used by `tbpw quantize`, `tbpw run`, `tbpw choose`, the plan selection and refinement, and the
benchmarks, so they cannot drift apart. For one model and imatrix it

- budgets with the metadata of the file llama-quantize will write (what a size target pays for), not the
  input's: the imatrix keys llama-quantize adds and tbpw's provenance keys (tbpw.model.provenance) included;
- gives every problem the context allocators that run tools need (fork-native: the model, the imatrix,
  a log folder);
- checks each allocator's answer (`make_plan`) and writes plans with `apply_plan`, which verifies the
  output tensor by tensor;
- records in every file it writes how it was made: tbpw's version, the llama.cpp build, the target, the
  allocator and its options, the imatrix's sha256, and what the caller adds (`provenance`: the metric, the
  recipe's hash, the calibration data). A plan's metadata bytes are those of exactly these keys; a problem's
  budget reserves the longest allocator values, so that every allocator's plan fits a size target.
- with a `store` (tbpw.quantize.store.TensorStore), writes each plan by assembling tensors quantized once
  (the file llama-quantize would write, in I/O time) instead of running llama-quantize.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tbpw.allocate.apply import Applied, apply_plan
from tbpw.allocate.constraints import Constraints
from tbpw.allocate.plan import Plan, make_plan
from tbpw.allocate.problem import (
    AllocationContext,
    AllocationProblem,
    AllocatorPlugin,
    ErrorTableLike,
    build_problem,
)
from tbpw.errors import TbpwError
from tbpw.files.digest import content_sha256
from tbpw.imatrix.reader import Imatrix, ImatrixMatch
from tbpw.llamacpp.build import active_build
from tbpw.llamacpp.quantize import OutputMetadata, output_metadata
from tbpw.model import provenance as records
from tbpw.model.budget import Target
from tbpw.model.inventory import ModelInventory
from tbpw.version import __version__

if TYPE_CHECKING:
    from tbpw.quantize.store import StoreSource, TensorStore


def allocate(inventory: ModelInventory, problem: AllocationProblem, allocator: AllocatorPlugin, *,
             metadata_bytes: int | None = None) -> Plan:
    """Run `allocator` (a plugin instance) on `problem` and return the checked plan."""
    return make_plan(inventory, problem, allocator.allocate(problem), allocator=allocator.name,
                     options=allocator.options.model_dump(mode="json"), metadata_bytes=metadata_bytes)


@dataclass
class Planner:
    """Plans and quantized files for one float model and its imatrix."""

    model: Path
    imatrix: Path | None
    constraints: Constraints = field(default_factory=Constraints)
    log_dir: Path | None = None  # where allocators that run tools keep their logs
    threads: int | None = None
    # provenance fields the caller knows (metric, recipe_sha256, calibration, ...: tbpw.model.provenance.FIELDS)
    provenance: Mapping[str, str] = field(default_factory=dict)
    store: TensorStore | None = None  # None: every plan is written by llama-quantize

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        self.imatrix = Path(self.imatrix) if self.imatrix is not None else None
        if not isinstance(self.constraints, Constraints):
            self.constraints = Constraints.parse(self.constraints)

    @cached_property
    def inventory(self) -> ModelInventory:
        return ModelInventory.load(self.model)

    @cached_property
    def output_metadata(self) -> OutputMetadata:
        """The metadata llama-quantize writes from this model and imatrix, before tbpw's keys."""
        return output_metadata(self.model, self.imatrix)

    @cached_property
    def _fixed_provenance(self) -> dict[str, str]:
        known = {"version": __version__}
        try:
            build = active_build()
            known["llama_cpp"] = f"b{build.build_number} {build.build_commit} {build.backend}"
        except TbpwError:
            pass  # planning alone needs no build (a dry run); writing does, and then finds this same one
        if self.imatrix is not None:
            known["imatrix_sha256"] = content_sha256(self.imatrix)
        return {**known, **self.provenance}

    def record(self, **fields: str) -> dict[str, str]:
        """The `tbpw.*` keys of a file made from this model and imatrix, `fields` added or replaced ("" drops one)."""
        return records.record(**{**self._fixed_provenance, **fields})

    def provenance_kv(self, target: Target, allocator: str, options: Mapping[str, Any]) -> dict[str, str]:
        """The `tbpw.*` keys the file of a plan of `allocator` with `options` for `target` records."""
        text = f"{target.bpw!r} bpw" if target.bpw is not None else f"{target.size} bytes"
        return self.record(target=text, allocator=allocator, allocator_options=records.compact_json(dict(options)))

    def metadata_bytes(self, target: Target, allocator: str, options: Mapping[str, Any]) -> int:
        """Bytes before the tensor data in the file of such a plan (imatrix and provenance keys included)."""
        return self.output_metadata.size(self.provenance_kv(target, allocator, options))

    def budget_metadata_bytes(self, target: Target) -> int:
        """The metadata a size target's budget pays for: the allocator's values at their longest."""
        widest = "x" * records.MAX_BYTES
        kv = {**self.provenance_kv(target, "", {}), records.PREFIX + "allocator": widest,
              records.PREFIX + "allocator_options": widest}
        return self.output_metadata.size(kv)

    @cached_property
    def imatrix_match(self) -> ImatrixMatch | None:
        """How the imatrix lines up with the model; an imatrix made for another model (other tensor names,
        widths or expert counts) or holding impossible values is refused here, before anything is planned."""
        if self.imatrix is None:
            return None
        return Imatrix.load(self.imatrix).check_against(self.inventory)

    def problem(self, table: ErrorTableLike, target: Target) -> AllocationProblem:
        _ = self.imatrix_match
        context = AllocationContext(model=self.model, imatrix=self.imatrix, log_dir=self.log_dir, threads=self.threads)
        return build_problem(self.inventory, table, target, self.constraints,
                             metadata_bytes=self.budget_metadata_bytes(target), context=context)

    def plan(self, table: ErrorTableLike, target: Target, allocator: AllocatorPlugin, *,
             problem: AllocationProblem | None = None) -> Plan:
        """The checked plan of `allocator` (a plugin instance) for `target` (pass `problem` to reuse one across
        allocators)."""
        options = allocator.options.model_dump(mode="json")
        return allocate(self.inventory, problem or self.problem(table, target), allocator,
                        metadata_bytes=self.metadata_bytes(target, allocator.name, options))

    @cached_property
    def store_source(self) -> StoreSource | None:
        """The store's blobs of this model and imatrix (None without a store)."""
        return self.store.source(self.model, self.imatrix) if self.store is not None else None

    def write(self, plan: Plan, out: Path | str, *, log_path: Path | str | None = None) -> Applied:
        """Quantize the model as `plan` says (assembled from the store, else with stock llama-quantize), verify
        it, and save the plan beside it; the file records its provenance."""
        return apply_plan(plan, self.model, self.imatrix, out, threads=self.threads, log_path=log_path,
                          kv=self.provenance_kv(plan.target, plan.allocator, plan.allocator_options),
                          store=self.store_source)
