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
- the result, a `Plan`: the type, bytes and error of every tensor of the model, checked against the
  budget, and its JSON form.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import TbpwError
from .gguf_model import ModelInventory, TensorInfo, effective_type, row_bytes, type_name

# --target-size units. The fork reads them as binary multiples; so does tbpw, with or without "i"/"b".
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(?:([kmgt])(?:i?b)?|(b))?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes of a size such as "1.5GiB", "900m", "123456" or "2t" (k, m, g, t are powers of 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise TbpwError(f"target size {text!r} is not a size: write a number with an optional unit "
                        "b, k, kib, m, mib, g, gib, t or tib (e.g. 1.5gib)")
    unit = (m.group(2) or m.group(3) or "").lower()
    return int(math.floor(float(m.group(1)) * _UNITS[unit]))


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit} ({n} bytes)"
    return f"{n} bytes"


@dataclass(frozen=True)
class Target:
    """Exactly one of a bits-per-weight target (metadata excluded) or a file size in bytes."""

    bpw: float | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        if (self.bpw is None) == (self.size is None):
            raise TbpwError("give exactly one target: --target-bpw X or --target-size N")
        if self.bpw is not None and not (0 < self.bpw <= 64):
            raise TbpwError(f"target bpw {self.bpw} is out of range: give a value above 0 (e.g. 4.5)")
        if self.size is not None and self.size <= 0:
            raise TbpwError(f"target size {self.size} is not positive: give a file size such as 2.5gib")

    @classmethod
    def parse(cls, bpw: float | None = None, size: str | int | None = None) -> "Target":
        return cls(bpw=bpw, size=None if size is None else parse_size(size))

    def describe(self) -> str:
        return f"{self.bpw} bpw" if self.bpw is not None else f"a file of {format_size(self.size or 0)}"

    def to_json(self) -> dict[str, Any]:
        return {"bpw": self.bpw, "size": self.size}


# ---------------------------------------------------------------------------------------------------
# What an error table must offer (tbpw.measure.ErrorTable and tbpw.forkstate.ForkState both do).


class TableCandidate(Protocol):
    type: str
    bytes: int
    error: float


class TableTensor(Protocol):
    name: str
    n_elements: int
    candidates: Sequence[TableCandidate]


class ErrorTableLike(Protocol):
    tensors: Sequence[TableTensor]


# ---------------------------------------------------------------------------------------------------
# The problem an allocator receives.


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
        return c.bytes if c is not None else sum(_padded(m.data_bytes(t), self.alignment) for m in self.members)


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
    context: Mapping[str, Any] = field(default_factory=dict)  # model/imatrix paths for allocators that run tools

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


# ---------------------------------------------------------------------------------------------------
# Constraints.


class Constraints(BaseModel):
    """Rules every allocator obeys (they rewrite the problem before the allocator sees it).

    Role keys are regular expressions matched against the whole role (``attn_v``, ``ffn_.*_exps``);
    pin keys are regular expressions searched in the tensor name, like llama-quantize's ``--tensor-type``.
    """

    model_config = ConfigDict(extra="forbid")

    pins: dict[str, str] = Field(default_factory=dict, description="tensor-name regex -> type; first match wins")
    allowed_types: dict[str, list[str]] = Field(default_factory=dict, description="role regex -> allowed types")
    min_bpw: dict[str, float] = Field(default_factory=dict, description="role regex -> lowest bpw allowed")
    max_bpw: dict[str, float] = Field(default_factory=dict, description="role regex -> highest bpw allowed")
    share_type: list[list[str]] = Field(default_factory=list,
                                        description="sets of roles whose tensors in one layer take one type, "
                                                    "e.g. [[ffn_gate_exps, ffn_up_exps]]")

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None) -> "Constraints":
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "constraints"
            raise TbpwError(f"constraint {where!r}: {first['msg']}; constraints are: "
                            f"{', '.join(cls.model_fields)}") from exc


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TbpwError(f"{what} {pattern!r} is not a regular expression ({exc}): fix the pattern") from exc


def _role_rules(rules: Mapping[str, Any], what: str) -> list[tuple[re.Pattern[str], Any]]:
    return [(_compile(k, what), v) for k, v in rules.items()]


def _first_rule(rules: list[tuple[re.Pattern[str], Any]], role: str) -> Any:
    return next((v for pattern, v in rules if pattern.fullmatch(role)), None)


def _type(t: str, where: str) -> str:
    try:
        return type_name(str(t))
    except (KeyError, ValueError):
        raise TbpwError(f"{where}: {t!r} is not a ggml type; use names such as Q4_K, IQ3_S, Q8_0, BF16") from None


def _padded(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment if alignment > 0 else n


# ---------------------------------------------------------------------------------------------------
# Building the problem.


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
                  metadata_bytes: int | None = None, context: Mapping[str, Any] | None = None) -> AllocationProblem:
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
    fixed = sum(_padded(t.stored_bytes, alignment) for t in inventory.tensors if not t.quantizable)
    pinned_bytes = sum(_padded(inventory[n].bytes_as(t), alignment) for n, t in pins.items())

    allowed = _role_rules({k: [_type(x, f"allowed_types[{k!r}]") for x in v] for k, v in constraints.allowed_types.items()},
                          "role pattern")
    lows = _role_rules(constraints.min_bpw, "role pattern")
    highs = _role_rules(constraints.max_bpw, "role pattern")

    units: list[DecidableTensor] = []
    for info in decidable:
        if info.name in pins:
            continue
        errors = _table_candidates(info, entries[info.name])
        types = list(errors)
        rule = _first_rule(allowed, info.role)
        if rule is not None:
            wanted = {info.effective_type(t) for t in rule}
            types = [t for t in types if t in wanted]
        low, high = _first_rule(lows, info.role), _first_rule(highs, info.role)
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
                                context=dict(context or {}))
    _check_reachable(problem)
    return problem


def _pinned_errors(inventory: ModelInventory, entries: Mapping[str, TableTensor], pins: Mapping[str, str]) -> dict[str, float]:
    out = {}
    for name, t in pins.items():
        for c in entries[name].candidates:
            if inventory[name].effective_type(type_name(c.type)) == t and math.isfinite(float(c.error)):
                out[name] = min(float(c.error), out.get(name, math.inf))
    return out


def _resolve_pins(inventory: ModelInventory, decidable: list[TensorInfo], pins: Mapping[str, str]) -> dict[str, str]:
    rules = [(_compile(p, "pin pattern"), p, _type(t, f"pin {p!r}")) for p, t in pins.items()]
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
        cands.append(Candidate(type=t, bytes=sum(_padded(m.data_bytes(t), alignment) for m in members),
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


# ---------------------------------------------------------------------------------------------------
# The result.


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
        return self.metadata_bytes + sum(_padded(t.bytes, self.alignment) for t in self.tensors)

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
            "tensors": [t.to_json() for t in self.tensors],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Plan":
        try:
            return cls(model=data["model"], allocator=data["allocator"],
                       allocator_options=dict(data.get("allocator_options") or {}),
                       target=Target(bpw=data.get("target_bpw"), size=data.get("target_size")),
                       n_elements=int(data["n_elements"]), budget_bytes=int(data["budget_bytes"]),
                       tensors=tuple(PlannedTensor(t["name"], t["type"], int(t["bytes"]), t.get("error"), t["source"])
                                     for t in data["tensors"]),
                       metadata_bytes=int(data["metadata_bytes"]), alignment=int(data["alignment"]))
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
                tensors=tuple(tensors), metadata_bytes=meta, alignment=inventory.alignment)


def allocate(inventory: ModelInventory, problem: AllocationProblem, name: str,
             options: Mapping[str, Any] | BaseModel | None = None, *, manager: Any = None,
             metadata_bytes: int | None = None) -> Plan:
    """Run the allocator plugin `name` on `problem` and return the checked plan."""
    from .plugins import get_manager

    registry = (manager or get_manager()).allocators()
    validated = options if isinstance(options, BaseModel) else registry.validate_options(name, dict(options or {}))
    choice = registry.create(name, validated).allocate(problem)
    return make_plan(inventory, problem, choice, allocator=name, options=validated.model_dump(mode="json"),
                     metadata_bytes=metadata_bytes)

