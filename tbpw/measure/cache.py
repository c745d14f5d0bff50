"""The measurement cache's entries checked against the model they claim to measure.

A cached table is only reused when it is intact (its seal: the size and sha256 recorded when it was written,
tbpw.files.sealed), parses, and lists exactly the model's tensors with their element and byte counts and finite
errors; anything else is discarded with a note and measured again (never an error a rerun repeats). The lines of
`partial.jsonl` (the tensors an interrupted measurement finished) each carry a checksum of their content and are
adopted only when it matches and the tensor has all its candidates: a line cut or edited is measured again.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from tbpw.errors import TbpwError
from tbpw.files import sealed
from tbpw.measure.table import ErrorTable, TensorErrors
from tbpw.model.inventory import ModelInventory


def note(line: str) -> None:
    print(line if line.startswith("note: ") else f"note: {line}", file=sys.stderr)


def cached_table(final: Path, inventory: ModelInventory, names: list[str]) -> ErrorTable | None:
    """The finished table of a cache entry, or None; one that does not parse or does not match the model
    (tensor names, element counts, byte counts) is discarded, with a note, and measured again."""
    if not sealed.trusted(final, "cached error table", note):
        return None
    try:
        table = ErrorTable.read_json(final)
        problem = mismatch(table.tensors, inventory, names)
    except TbpwError as exc:
        problem = str(exc)
    if problem:
        note(f"discarding the cached error table {final} ({problem}); measuring again")
        sealed.discard(final)
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
            if not math.isfinite(c.error) or c.error < 0:
                return f"{t.name} as {c.type} has the error {c.error}, not a finite number of at least 0"
    return ""


def _checksum(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def partial_line(result: TensorErrors) -> str:
    """One finished tensor as a line of `partial.jsonl`, with a checksum of its content."""
    payload = result.to_json()
    return json.dumps({**payload, "check": _checksum(payload)}) + "\n"


def read_partial(path: Path, inventory: ModelInventory, names: list[str],
                 candidates: Callable[[str], list[str]]) -> dict[str, TensorErrors]:
    """The tensors of `partial.jsonl` an interrupted run finished: each line whose checksum matches, of a tensor
    still to measure, with exactly its candidates (`candidates(name)`), its bytes and finite errors. A line cut short
    by a kill is ignored; one that was changed is noted and measured again."""
    out: dict[str, TensorErrors] = {}
    if not path.is_file():
        return out
    refused = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            data = json.loads(line)
            check = data.pop("check")
            t = TensorErrors.from_json(data)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            continue  # cut short by a kill
        if (check != _checksum(data) or t.name not in names or mismatch([t], inventory)
                or sorted(c.type for c in t.candidates) != sorted(candidates(t.name))):
            refused += 1
            continue
        out[t.name] = t
    if refused:
        note(f"{refused} line(s) of {path} are not what the measurement wrote: those tensors are measured again")
    return out
