"""The one path from an error table to a written model: problem -> allocator plugin -> plan -> llama-quantize.

`Planner` is used by `tbpw quantize`, `tbpw run`, `tbpw choose`, the plan selection and refinement, and the
benchmarks, so they cannot drift apart. For one model and imatrix it

- budgets with the metadata of the file llama-quantize will write (what a size target pays for), not the
  input's;
- gives every problem the context allocators that run tools need (fork-native: the model, the imatrix,
  a log folder);
- checks each allocator's answer (`make_plan`) and writes plans with `apply_plan`, which verifies the
  output tensor by tensor;
- with a `store` (tbpw.quantize.store.TensorStore), writes each plan by assembling tensors quantized once
  (the file llama-quantize would write, in I/O time) instead of running llama-quantize.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from tbpw.allocate.apply import Applied, apply_plan
from tbpw.allocate.budget import Target
from tbpw.allocate.constraints import Constraints
from tbpw.allocate.plan import Plan, make_plan
from tbpw.allocate.problem import AllocationContext, AllocationProblem, ErrorTableLike, build_problem
from tbpw.imatrix.reader import Imatrix, ImatrixMatch
from tbpw.llamacpp.quantize import output_metadata_bytes
from tbpw.model.inventory import ModelInventory
from tbpw.plugin.manager import PluginManager, get_manager

if TYPE_CHECKING:
    from tbpw.quantize.store import StoreSource, TensorStore


def allocate(inventory: ModelInventory, problem: AllocationProblem, name: str,
             options: Mapping[str, Any] | BaseModel | None = None, *, manager: PluginManager | None = None,
             metadata_bytes: int | None = None) -> Plan:
    """Run the allocator plugin `name` on `problem` and return the checked plan."""
    registry = (manager or get_manager()).allocators()
    validated = options if isinstance(options, BaseModel) else registry.validate_options(name, dict(options or {}))
    choice = registry.create(name, validated).allocate(problem)
    return make_plan(inventory, problem, choice, allocator=name, options=validated.model_dump(mode="json"),
                     metadata_bytes=metadata_bytes)


@dataclass
class Planner:
    """Plans and quantized files for one float model and its imatrix."""

    model: Path
    imatrix: Path | None
    constraints: Constraints = field(default_factory=Constraints)
    log_dir: Path | None = None  # where allocators that run tools keep their logs
    threads: int | None = None
    manager: PluginManager | None = None
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
    def imatrix_match(self) -> ImatrixMatch | None:
        """How the imatrix lines up with the model; an imatrix made for another model (other tensor names,
        widths or expert counts) or holding impossible values is refused here, before anything is planned."""
        if self.imatrix is None:
            return None
        return Imatrix.load(self.imatrix).check_against(self.inventory)

    @cached_property
    def metadata_bytes(self) -> int:
        """Bytes before the tensor data in the file llama-quantize writes (imatrix keys included)."""
        return output_metadata_bytes(self.model, self.imatrix)

    def problem(self, table: ErrorTableLike, target: Target) -> AllocationProblem:
        _ = self.imatrix_match
        context = AllocationContext(model=self.model, imatrix=self.imatrix, log_dir=self.log_dir, threads=self.threads)
        return build_problem(self.inventory, table, target, self.constraints, metadata_bytes=self.metadata_bytes,
                             context=context)

    def plan(self, table: ErrorTableLike, target: Target, allocator: str,
             options: Mapping[str, Any] | BaseModel | None = None, *, problem: AllocationProblem | None = None) -> Plan:
        """The checked plan of `allocator` for `target` (pass `problem` to reuse one across allocators)."""
        return allocate(self.inventory, problem or self.problem(table, target), allocator, options,
                        manager=self.manager, metadata_bytes=self.metadata_bytes)

    @cached_property
    def store_source(self) -> StoreSource | None:
        """The store's blobs of this model and imatrix (None without a store)."""
        return self.store.source(self.model, self.imatrix) if self.store is not None else None

    def write(self, plan: Plan, out: Path | str, *, log_path: Path | str | None = None) -> Applied:
        """Quantize the model as `plan` says (assembled from the store, else with stock llama-quantize), verify
        it, and save the plan beside it."""
        return apply_plan(plan, self.model, self.imatrix, out, threads=self.threads, log_path=log_path,
                          store=self.store_source)
