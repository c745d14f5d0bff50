"""Which ggml types are tried for a tensor, and the fork's reduction of measured candidates.

The default list is the fork's 20 types. For a tensor, a type whose block does not divide the row
becomes the type stock llama-quantize really writes (tbpw.model.ggml_types.effective_type: IQ* -> IQ4_NL, Q2_0/Q2_K/Q3_K
-> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, else F16), and a type llama-quantize has no fallback for
(Q1_0, NVFP4) is left out there; IQ types are tried only where the imatrix has data for the tensor
(llama-quantize refuses most of them otherwise, and they are built for it); duplicates are removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from tbpw.errors import TbpwError
from tbpw.model.ggml_types import FORK_TYPES, IQ_TYPES, STOCK_EXTRA_TYPES, can_write, type_id, type_name
from tbpw.model.inventory import TensorInfo

DEFAULT_TYPES = FORK_TYPES
# Names that stand for several types in a candidate list: `[fork, MXFP4]` is the fork's 20 and MXFP4.
TYPE_SETS: dict[str, tuple[str, ...]] = {"fork": FORK_TYPES, "extra": STOCK_EXTRA_TYPES}


def normalize_types(types: Iterable[str] | None) -> tuple[str, ...]:
    """Upper-cased, validated ggml type names in the given order, the sets of TYPE_SETS expanded (None: the
    fork's 20)."""
    if types is None:
        return DEFAULT_TYPES
    out: list[str] = []
    for t in types:
        key = str(t).strip()
        for one in TYPE_SETS.get(key.lower(), (key,)):
            try:
                name = type_name(one)
            except KeyError:
                known = ", ".join((*DEFAULT_TYPES, *STOCK_EXTRA_TYPES))
                raise TbpwError(f"unknown ggml type {t!r} in the candidate list: name ggml types ({known}) or the "
                                f"sets {' and '.join(TYPE_SETS)}") from None
            if name not in out:
                out.append(name)
    if not out:
        raise TbpwError("the candidate list is empty: name at least one ggml type")
    return tuple(out)


def for_tensor(info: TensorInfo, types: Sequence[str] | None = None, has_imatrix: bool = True) -> list[str]:
    """The distinct types tbpw measures for `info`: fallbacks applied, IQ only with imatrix data.

    Sorted by ggml enum value, as the fork sorts them (the order does not change any result).
    """
    out: set[str] = set()
    for t in normalize_types(types):
        if (t in IQ_TYPES and not has_imatrix) or not can_write(t, info.row_length):
            continue
        out.add(info.effective_type(t))
    return sorted(out, key=type_id)


class _Candidate(Protocol):
    # read-only, so that frozen dataclasses match
    @property
    def type(self) -> str: ...
    @property
    def bytes(self) -> int: ...
    @property
    def error(self) -> float: ...


C = TypeVar("C", bound=_Candidate)

_EPSILON = 1e-12


def fork_pareto(candidates: Iterable[C], convex: bool = True) -> list[C]:
    """The fork's reduction of a tensor's measured candidates (what its state file stores).

    1. sort by bytes, then error, then type enum; keep the first of each byte size (equal bytes: the
       lower error wins, e.g. Q4_K over IQ4_NL and Q4_0 at 4.5 bpw);
    2. keep only candidates whose error is strictly below every cheaper one's (monotone frontier);
    3. with three or more left and `convex`, keep the lower convex hull of (bytes, error): a point that
       lies on or above the chord of its neighbours (cross product <= 1e-12) goes.
    """
    ranked = sorted(candidates, key=lambda c: (c.bytes, c.error, type_id(c.type)))
    unique: list[C] = []
    for c in ranked:
        if not unique or unique[-1].bytes != c.bytes:
            unique.append(c)
    frontier: list[C] = []
    best = float("inf")
    for c in unique:
        if c.error < best:
            best = c.error
            frontier.append(c)
    if not convex or len(frontier) < 3:
        return frontier
    hull: list[C] = []
    for c in frontier:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], c) <= _EPSILON:
            hull.pop()
        hull.append(c)
    return hull


def _cross(a: _Candidate, b: _Candidate, c: _Candidate) -> float:
    return (float(b.bytes) - float(a.bytes)) * (c.error - a.error) - (float(c.bytes) - float(a.bytes)) * (b.error - a.error)


@dataclass(frozen=True)
class CandidateSet:
    """The requested candidate types (part of the measurement cache key)."""

    types: tuple[str, ...] = DEFAULT_TYPES

    @classmethod
    def of(cls, types: Iterable[str] | None) -> CandidateSet:
        return cls(normalize_types(types))
