"""The allocation problem and its solution: error table + budget + constraints -> a type per tensor.

An allocator plugin only ever sees an `AllocationProblem`: decidable tensors with their candidate
(type, bytes, error) lists and a byte budget. Everything else happens here, around it:

- the budget: `--target-bpw X` counts all tensor bytes against all elements, metadata excluded, as the
  fork does (budget = floor(X * elements / 8) - fixed bytes - pinned bytes; the fork rounds to the
  nearest byte, tbpw down so that a plan never lands above its target); `--target-size N`
  is a file size, so it also pays for the metadata and every tensor's alignment padding;
- constraints, applied by rewriting the problem so that every allocator obeys them without knowing
  them: pins leave the problem (their bytes leave the budget), allowed types and bpw bounds per role
  shorten candidate lists, and tensors that must share a type become one decidable unit whose
  candidates are the types they have in common (bytes and errors added);

The result, a type per tensor, becomes a `tbpw.allocate.plan.Plan`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tbpw.allocate.constraints import (
    Constraints,
    checked_type,
    compile_pattern,
    first_rule,
    role_rules,
)
from tbpw.errors import TbpwError
from tbpw.model.budget import Target, format_size, padded
from tbpw.model.ggml_types import effective_type, row_bytes, type_name
from tbpw.model.inventory import ModelInventory, TensorInfo


# What an error table gives, read-only (so that frozen dataclasses and lists of subtypes match).
class TableCandidate(Protocol):
    @property
    def type(self) -> str: ...
    @property
    def bytes(self) -> int: ...
    @property
    def error(self) -> float: ...


class TableTensor(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def n_elements(self) -> int: ...
    @property
    def candidates(self) -> Sequence[TableCandidate]: ...


class ErrorTableLike(Protocol):
    @property
    def tensors(self) -> Sequence[TableTensor]: ...


@dataclass(frozen=True)
class Candidate:
    type: str  # ggml type name as stock llama-quantize will write it (fallbacks applied)
    bytes: int  # what this choice costs against the budget
    error: float  # the proxy error (sum over members for a shared-type group)
    bpw: float  # 8 x data bytes / elements of the tensor (padding excluded)


@dataclass(frozen=True)
class Member:
    """A real tensor inside a decidable unit (a unit is one tensor unless a share-type group made it)."""

    name: str
    row_length: int
    n_rows: int
    errors: Mapping[str, float]  # type -> this tensor's own error

    @property
    def n_elements(self) -> int:
        return self.row_length * self.n_rows

    def data_bytes(self, t: str) -> int:
        return self.n_rows * row_bytes(effective_type(t, self.row_length), self.row_length)


@dataclass(frozen=True)
class DecidableTensor:
    name: str  # the tensor's name, or "a+b" for a shared-type group
    n_elements: int
    candidates: tuple[Candidate, ...]  # sorted by bytes, then error
    layer: int | None
    role: str
    n_experts: int
    members: tuple[Member, ...]
    alignment: int = 0  # > 0 when bytes are counted padded to the file's alignment (size targets)

    @property
    def row_length(self) -> int:
        return self.members[0].row_length

    @property
    def is_group(self) -> bool:
        return len(self.members) > 1

    def candidate(self, t: str) -> Candidate | None:
        return next((c for c in self.candidates if c.type == t), None)

    def effective_type(self, t: str) -> str:
        return effective_type(t, self.row_length)

    def data_bytes(self, t: str) -> int:
        return sum(m.data_bytes(t) for m in self.members)

    def bytes_as(self, t: str) -> int:
        """Budget bytes of any type, measured or not (an allocator may choose outside the list, as the
        fork's caps do; such a choice has no known error)."""
        c = self.candidate(t)
        return c.bytes if c is not None else sum(padded(m.data_bytes(t), self.alignment) for m in self.members)


@dataclass(frozen=True)
class AllocationContext:
    """Where the problem comes from, for allocators that run llama.cpp themselves (fork-native)."""

    model: Path | None = None  # the float GGUF being quantized
    imatrix: Path | None = None
    log_dir: Path | None = None  # where such an allocator keeps its tools' logs
    threads: int | None = None


@dataclass(frozen=True)
class AllocationProblem:
    """Everything an allocator may look at. Constraints are already applied to `tensors`."""

    tensors: tuple[DecidableTensor, ...]
    budget: int  # bytes the decidable tensors may use together
    n_elements: int  # elements of the whole model (the bpw denominator)
    fixed_bytes: int  # bytes outside the problem: non-decidable and pinned tensors (+ metadata for sizes)
    tied_embeddings: bool  # no output.weight: token_embd is also the output projection
    target: Target
    pinned: Mapping[str, str] = field(default_factory=dict)  # tensor -> type, outside the problem
    pinned_errors: Mapping[str, float] = field(default_factory=dict)  # the table's error of a pinned choice, if measured
    context: AllocationContext = field(default_factory=AllocationContext)

    @property
    def min_bytes(self) -> int:
        return sum(t.candidates[0].bytes for t in self.tensors)

    @property
    def max_bytes(self) -> int:
        return sum(max(c.bytes for c in t.candidates) for t in self.tensors)

    def by_name(self) -> dict[str, DecidableTensor]:
        return {t.name: t for t in self.tensors}

    def total_bytes(self, types: Mapping[str, str]) -> int:
        return sum(t.bytes_as(types[t.name]) for t in self.tensors)

    def total_error(self, types: Mapping[str, str]) -> float:
        """Sum of the chosen candidates' errors (NaN when a choice has no measured error)."""
        total = 0.0
        for t in self.tensors:
            c = t.candidate(types[t.name])
            total += c.error if c is not None else math.nan
        return total


def _table_candidates(info: TensorInfo, entry: TableTensor) -> dict[str, float]:
    """type -> error for one tensor, types normalised to what stock llama-quantize writes; the table's
    byte counts must agree with the model's (a table measured on another model is an error)."""
    if entry.n_elements != info.n_elements:
        raise TbpwError(f"the error table's {info.name} has {entry.n_elements} elements, the model's has "
                        f"{info.n_elements}: the table belongs to another model, measure this one")
    errors: dict[str, float] = {}
    for c in entry.candidates:
        t = info.effective_type(type_name(c.type))
        if c.bytes != info.bytes_as(t):
            raise TbpwError(f"the error table gives {info.name} as {c.type} {c.bytes} bytes, the model says "
                            f"{info.bytes_as(t)}: the table belongs to another model, measure this one")
        if not math.isfinite(float(c.error)):
            continue
        if t not in errors or c.error < errors[t]:
            errors[t] = float(c.error)
    if not errors:
        raise TbpwError(f"the error table has no usable candidate for {info.name}: measure it again")
    return errors


def build_problem(inventory: ModelInventory, table: ErrorTableLike, target: Target,
                  constraints: Constraints | Mapping[str, Any] | None = None, *,
                  metadata_bytes: int | None = None, context: AllocationContext | None = None) -> AllocationProblem:
    """The allocation problem of `inventory` for `target`, with `constraints` applied.

    The decidable tensors are the ones stock llama-quantize may quantize; the table must cover every
    one of them. `metadata_bytes` is the size of the output file's metadata (size targets only; by
    default the input's).
    """
    if not isinstance(constraints, Constraints):
        constraints = Constraints.parse(constraints)
    entries = {t.name: t for t in table.tensors}
    decidable = [t for t in inventory.tensors if t.quantizable]
    missing = [t.name for t in decidable if t.name not in entries]
    if missing:
        raise TbpwError(f"the error table has no entry for {missing[0]} (and {len(missing) - 1} more): "
                        "measure the model again with this build and candidate set")
    unknown = [n for n in entries if n not in inventory.by_name]
    if unknown:
        raise TbpwError(f"the error table names {unknown[0]}, which {inventory.path.name} does not have: "
                        "the table belongs to another model")

    alignment = inventory.alignment if target.size is not None else 0
    pins = _resolve_pins(inventory, decidable, constraints.pins)
    fixed = sum(padded(t.stored_bytes, alignment) for t in inventory.tensors if not t.quantizable)
    pinned_bytes = sum(padded(inventory[n].bytes_as(t), alignment) for n, t in pins.items())

    allowed = role_rules({k: [checked_type(x, f"allowed_types[{k!r}]") for x in v] for k, v in constraints.allowed_types.items()},
                          "role pattern")
    lows = role_rules(constraints.min_bpw, "role pattern")
    highs = role_rules(constraints.max_bpw, "role pattern")

    units: list[DecidableTensor] = []
    for info in decidable:
        if info.name in pins:
            continue
        errors = _table_candidates(info, entries[info.name])
        types = list(errors)
        rule = first_rule(allowed, info.role)
        if rule is not None:
            wanted = {info.effective_type(t) for t in rule}
            types = [t for t in types if t in wanted]
        low, high = first_rule(lows, info.role), first_rule(highs, info.role)
        bpw = {t: 8.0 * info.bytes_as(t) / info.n_elements for t in types}
        types = [t for t in types if (low is None or bpw[t] >= low - 1e-9) and (high is None or bpw[t] <= high + 1e-9)]
        if not types:
            raise TbpwError(f"the constraints leave no candidate type for {info.name} (role {info.role}): "
                            "loosen allowed_types / min_bpw / max_bpw for that role")
        member = Member(info.name, info.row_length, info.n_rows, {t: errors[t] for t in types})
        units.append(_unit(info.name, info.layer, info.role, info.n_experts, (member,), alignment))

    units = _share_types(units, constraints.share_type, alignment)
    n_elements = inventory.n_elements
    if target.bpw is not None:
        # The fork rounds to the nearest byte; rounding down keeps the result at or under the target
        # (the two differ by at most one byte of budget).
        total = int(math.floor(target.bpw * n_elements / 8.0))
    else:
        total = int(target.size or 0)
        fixed += inventory.metadata_bytes if metadata_bytes is None else metadata_bytes
    budget = total - fixed - pinned_bytes
    problem = AllocationProblem(tensors=tuple(units), budget=budget, n_elements=n_elements,
                                fixed_bytes=fixed + pinned_bytes, tied_embeddings="output.weight" not in inventory.by_name,
                                target=target, pinned=pins, pinned_errors=_pinned_errors(inventory, entries, pins),
                                context=context or AllocationContext())
    _check_reachable(problem)
    return problem


def _pinned_errors(inventory: ModelInventory, entries: Mapping[str, TableTensor], pins: Mapping[str, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, t in pins.items():
        for c in entries[name].candidates:
            if inventory[name].effective_type(type_name(c.type)) == t and math.isfinite(float(c.error)):
                out[name] = min(float(c.error), out.get(name, math.inf))
    return out


def _resolve_pins(inventory: ModelInventory, decidable: list[TensorInfo], pins: Mapping[str, str]) -> dict[str, str]:
    rules = [(compile_pattern(p, "pin pattern"), p, checked_type(t, f"pin {p!r}")) for p, t in pins.items()]
    quantizable = {t.name for t in decidable}
    used: set[str] = set()
    out: dict[str, str] = {}
    for info in inventory.tensors:
        for pattern, source, t in rules:
            if pattern.search(info.name):
                if info.name not in quantizable:
                    raise TbpwError(f"pin {source!r} matches {info.name}, which llama-quantize never quantizes: "
                                    "anchor the pattern (e.g. ^blk\\.0\\.attn_v\\.weight$)")
                out[info.name] = info.effective_type(t)
                used.add(source)
                break
    for _, source, _t in rules:
        if source not in used:
            raise TbpwError(f"pin {source!r} matches no tensor of {inventory.path.name}: check the pattern")
    return out


def _unit(name: str, layer: int | None, role: str, n_experts: int, members: tuple[Member, ...],
          alignment: int) -> DecidableTensor:
    common = [t for t in members[0].errors if all(t in m.errors for m in members)]
    n_elements = sum(m.n_elements for m in members)
    cands = []
    for t in common:
        data = sum(m.data_bytes(t) for m in members)
        cands.append(Candidate(type=t, bytes=sum(padded(m.data_bytes(t), alignment) for m in members),
                               error=sum(m.errors[t] for m in members), bpw=8.0 * data / n_elements))
    cands.sort(key=lambda c: (c.bytes, c.error, c.type))
    return DecidableTensor(name=name, n_elements=n_elements, candidates=tuple(cands), layer=layer, role=role,
                           n_experts=n_experts, members=members, alignment=alignment)


def _share_types(units: list[DecidableTensor], groups: list[list[str]], alignment: int) -> list[DecidableTensor]:
    """Merge, per layer, the tensors whose roles are in one share-type set into one decidable unit."""
    if not groups:
        return units
    role_group = {}
    for i, roles in enumerate(groups):
        for role in roles:
            if role in role_group:
                raise TbpwError(f"role {role!r} is in two share_type groups: put it in one")
            role_group[role] = i
    merged: dict[tuple[int, int | None], list[DecidableTensor]] = {}
    out: list[DecidableTensor | tuple[int, int | None]] = []
    for u in units:
        g = role_group.get(u.role)
        if g is None:
            out.append(u)
            continue
        key = (g, u.layer)
        if key not in merged:
            merged[key] = []
            out.append(key)
        merged[key].append(u)
    result = []
    for item in out:
        if isinstance(item, DecidableTensor):
            result.append(item)
            continue
        parts = merged[item]
        if len(parts) == 1:
            result.append(parts[0])
            continue
        members = tuple(m for p in parts for m in p.members)
        unit = _unit("+".join(p.name for p in parts), parts[0].layer, "+".join(p.role for p in parts),
                     max(p.n_experts for p in parts), members, alignment)
        if not unit.candidates:
            raise TbpwError(f"{' and '.join(p.name for p in parts)} must share a type but have no candidate "
                            "type in common: allow a common type or drop the share_type group")
        result.append(unit)
    return result


def reachable_bpw(problem: AllocationProblem) -> tuple[float, float]:
    lo = problem.fixed_bytes + problem.min_bytes
    hi = problem.fixed_bytes + problem.max_bytes
    return 8.0 * lo / problem.n_elements, 8.0 * hi / problem.n_elements


def _check_reachable(problem: AllocationProblem) -> None:
    if problem.min_bytes <= problem.budget <= problem.max_bytes:
        return
    low = problem.budget < problem.min_bytes
    which = "below the cheapest" if low else "above the largest"
    if problem.target.bpw is not None:
        lo, hi = reachable_bpw(problem)
        # shown rounded inward so that both ends are really reachable
        raise TbpwError(f"target {problem.target.bpw} bpw is {which} mix this model allows with these "
                        f"candidates and constraints: give a target from {math.ceil(lo * 1e4) / 1e4:.4f} "
                        f"to {math.floor(hi * 1e4) / 1e4:.4f} bpw")
    lo_b = problem.fixed_bytes + problem.min_bytes
    hi_b = problem.fixed_bytes + problem.max_bytes
    raise TbpwError(f"target size {format_size(problem.target.size or 0)} is {which} file this model allows with "
                    f"these candidates and constraints: give a size from {lo_b} to {hi_b} bytes")



class AllocatorPlugin(Protocol):
    """What planning uses of an allocator: an instance of the plugin contract `tbpw.Allocator` (tbpw.plugin.base),
    which a caller above this floor makes from its name and options and hands in."""

    @property
    def name(self) -> str: ...

    @property
    def options(self) -> Any: ...

    def allocate(self, problem: AllocationProblem) -> dict[str, str]: ...
