"""Targets and budgets: bits per weight or a file size, in bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from tbpw.errors import TbpwError

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
    def parse(cls, bpw: float | None = None, size: str | int | None = None) -> Target:
        return cls(bpw=bpw, size=None if size is None else parse_size(size))

    def describe(self) -> str:
        return f"{self.bpw} bpw" if self.bpw is not None else f"a file of {format_size(self.size or 0)}"

    def to_json(self) -> dict[str, Any]:
        return {"bpw": self.bpw, "size": self.size}


def padded(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment if alignment > 0 else n

