"""The measurement cache's entries checked against the model they claim to measure.

A cached table is only reused when it parses and lists exactly the model's tensors with their element and
byte counts; anything else is discarded with a note and measured again (never an error a rerun repeats).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from tbpw.errors import TbpwError
from tbpw.measure.table import ErrorTable, TensorErrors
from tbpw.model.inventory import ModelInventory


def note(line: str) -> None:
    print(f"note: {line}", file=sys.stderr)


def cached_table(final: Path, inventory: ModelInventory, names: list[str]) -> ErrorTable | None:
    """The finished table of a cache entry, or None; one that does not parse or does not match the model
    (tensor names, element counts, byte counts) is discarded, with a note, and measured again."""
    if not final.is_file():
        return None
    try:
        table = ErrorTable.read_json(final)
        problem = mismatch(table.tensors, inventory, names)
    except TbpwError as exc:
        problem = str(exc)
    if problem:
        note(f"discarding the cached error table {final} ({problem}); measuring again")
        final.unlink(missing_ok=True)
        return None
    table.meta["cached"] = True
    return table


def mismatch(tensors: Iterable[TensorErrors], inventory: ModelInventory, names: list[str] | None = None) -> str:
    """Why measured tensors do not belong to this model ("" when they do)."""
    listed = list(tensors)
    if names is not None and [t.name for t in listed] != names:
        return f"it holds {len(listed)} tensors, the model has {len(names)} to measure"
    for t in listed:
        info = inventory.by_name.get(t.name)
        if info is None:
            return f"the model has no tensor {t.name}"
        if t.n_elements != info.n_elements:
            return f"{t.name} has {t.n_elements} elements there, {info.n_elements} in the model"
        for c in t.candidates:
            try:
                expected = info.bytes_as(c.type)
            except (KeyError, TbpwError):
                return f"{t.name} lists an unknown type {c.type!r}"
            if c.bytes != expected:
                return f"{t.name} as {c.type} has {c.bytes} bytes there, {expected} in the model"
    return ""
