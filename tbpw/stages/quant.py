"""A quantized model of a run: what the stages that make one return, and what evaluation, the selection and the
report read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

QuantKind = Literal["stock", "tbpw", "other"]  # other: someone else's file, from compare_files


@dataclass
class Quant:
    """One quantized model of the run: a stock type, a (target, allocator) plan, or a file to compare with."""

    name: str
    kind: QuantKind
    path: Path
    bpw: float
    size_bytes: int
    target: str | None = None
    allocator: str | None = None
    types: dict[str, str] = field(default_factory=dict)
    note: str = ""
