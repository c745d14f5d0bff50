"""A plan: the type, bytes and error of every tensor of the model, checked against the problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tbpw.allocate.problem import AllocationProblem
from tbpw.errors import TbpwError
from tbpw.model.budget import Target, padded
from tbpw.model.ggml_types import effective_type, type_name
from tbpw.model.inventory import ModelInventory


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    type: str
    bytes: int  # data bytes as written (no padding)
    error: float | None  # the proxy error of this choice; None when not measured (fixed tensors, some caps)
    source: str  # "allocator", "pinned" or "fixed" (not quantizable, keeps its stored type)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "bytes": self.bytes,
                "error": None if self.error is None or not math.isfinite(self.error) else self.error,
                "source": self.source}


@dataclass(frozen=True)
class Plan:
    model: str
    allocator: str
    allocator_options: Mapping[str, Any]
    target: Target
    n_elements: int
    budget_bytes: int  # what the allocator was given
    tensors: tuple[PlannedTensor, ...]  # every tensor of the model, in file order
    metadata_bytes: int
    alignment: int
    # Set when the plan leaves budget unused that could have bought a better type (see `shortfall`).
    shortfall: str = ""

    @property
    def total_bytes(self) -> int:
        """All tensor data bytes (the numerator of bpw)."""
        return sum(t.bytes for t in self.tensors)

    @property
    def achieved_bpw(self) -> float:
        return 8.0 * self.total_bytes / self.n_elements

    @property
    def file_bytes(self) -> int:
        """The output file's size: metadata plus every tensor padded to the alignment."""
        return self.metadata_bytes + sum(padded(t.bytes, self.alignment) for t in self.tensors)

    @property
    def total_error(self) -> float:
        return float(sum(t.error for t in self.tensors if t.error is not None and math.isfinite(t.error)))

    def types(self) -> dict[str, str]:
        return {t.name: t.type for t in self.tensors}

    def decided(self) -> dict[str, str]:
        """Every tensor llama-quantize must be told about (allocated and pinned)."""
        return {t.name: t.type for t in self.tensors if t.source != "fixed"}

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "allocator": self.allocator,
            "allocator_options": dict(self.allocator_options),
            "target_bpw": self.target.bpw,
            "target_size": self.target.size,
            "achieved_bpw": self.achieved_bpw,
            "total_bytes": self.total_bytes,
            "file_bytes": self.file_bytes,
            "n_elements": self.n_elements,
            "budget_bytes": self.budget_bytes,
            "total_error": self.total_error,
            "metadata_bytes": self.metadata_bytes,
            "alignment": self.alignment,
            **({"shortfall": self.shortfall} if self.shortfall else {}),
            "tensors": [t.to_json() for t in self.tensors],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        try:
            return cls(model=data["model"], allocator=data["allocator"],
                       allocator_options=dict(data.get("allocator_options") or {}),
                       target=Target(bpw=data.get("target_bpw"), size=data.get("target_size")),
                       n_elements=int(data["n_elements"]), budget_bytes=int(data["budget_bytes"]),
                       tensors=tuple(PlannedTensor(t["name"], t["type"], int(t["bytes"]), t.get("error"), t["source"])
                                     for t in data["tensors"]),
                       metadata_bytes=int(data["metadata_bytes"]), alignment=int(data["alignment"]),
                       shortfall=str(data.get("shortfall") or ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise TbpwError(f"not a tbpw plan ({exc!r} missing or wrong): give a plan JSON written by tbpw quantize") from exc


def make_plan(inventory: ModelInventory, problem: AllocationProblem, choice: Mapping[str, str], *,
              allocator: str, options: Mapping[str, Any] | None = None, metadata_bytes: int | None = None) -> Plan:
    """Check an allocator's answer against the problem and spell it out for every tensor of the model."""
    units = problem.by_name()
    missing = [n for n in units if n not in choice]
    if missing:
        raise TbpwError(f"allocator {allocator!r} gave no type for {missing[0]}: it must return every tensor of the problem")
    extra = [n for n in choice if n not in units]
    if extra:
        raise TbpwError(f"allocator {allocator!r} returned {extra[0]!r}, which is not in the problem")
    chosen: dict[str, tuple[str, float | None]] = {}
    used = 0
    for name, unit in units.items():
        try:
            requested = type_name(choice[name])
        except (KeyError, ValueError):
            raise TbpwError(f"allocator {allocator!r} chose {choice[name]!r} for {name}, which is not a ggml type") from None
        used += unit.bytes_as(requested)
        for m in unit.members:
            t = effective_type(requested, m.row_length)  # what llama-quantize will write for this member
            chosen[m.name] = (t, m.errors.get(t))
    if used > problem.budget:
        raise TbpwError(f"allocator {allocator!r} used {used} bytes, {used - problem.budget} over the budget "
                        f"of {problem.budget}: it does not honour tbpw's budget; pick another allocator")
    tensors = []
    for info in inventory.tensors:
        if info.name in problem.pinned:
            t = problem.pinned[info.name]
            tensors.append(PlannedTensor(info.name, t, info.bytes_as(t), problem.pinned_errors.get(info.name), "pinned"))
        elif info.name in chosen:
            t, err = chosen[info.name]
            tensors.append(PlannedTensor(info.name, t, info.bytes_as(t), err, "allocator"))
        else:
            tensors.append(PlannedTensor(info.name, info.stored_type, info.stored_bytes, None, "fixed"))
    meta = inventory.metadata_bytes if metadata_bytes is None else metadata_bytes
    return Plan(model=str(inventory.path), allocator=allocator, allocator_options=dict(options or {}),
                target=problem.target, n_elements=inventory.n_elements, budget_bytes=problem.budget,
                tensors=tuple(tensors), metadata_bytes=meta, alignment=inventory.alignment,
                shortfall=shortfall(problem, choice, used))


def shortfall(problem: AllocationProblem, choice: Mapping[str, str], used: int) -> str:
    """Why the plan lands further below its target than the model's granularity forces, or "".

    A plan may end under its budget by less than the cheapest upgrade of any tensor: no choice could spend
    that remainder. When some tensor's next candidate with a lower error still fits in what is left, the
    allocator left budget unused that would have bought quality."""
    left = problem.budget - used
    best: tuple[int, str, str] | None = None
    for unit in problem.tensors:
        now = unit.candidate(type_name(choice[unit.name]))
        if now is None:
            continue  # a choice outside the candidate list has no known error to improve on
        for c in unit.candidates:
            step = c.bytes - now.bytes
            if 0 < step <= left and c.error < now.error and (best is None or step < best[0]):
                best = (step, unit.name, c.type)
    if best is None:
        return ""
    step, name, better = best
    return (f"lands {left} bytes ({8.0 * left / problem.n_elements:.4f} bpw) below its target although {name} as "
            f"{better} (+{step} bytes, a lower error) would have fitted: the allocator left budget unused")

