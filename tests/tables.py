"""Error tables for allocation tests: the fork's own (its state file) and a synthetic one over the real
tiny model's tensors with every candidate type, so that byte counts are the model's exact ones."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from tbpw.measure.candidates import for_tensor
from tbpw.model.ggml_types import nominal_bpw
from tbpw.model.inventory import ModelInventory


@dataclass(frozen=True)
class Cand:
    type: str
    bytes: int
    error: float


@dataclass(frozen=True)
class Entry:
    name: str
    n_elements: int
    candidates: tuple[Cand, ...]


@dataclass(frozen=True)
class Table:
    tensors: tuple[Entry, ...]


def _jitter(*parts: str) -> float:
    """A fixed pseudo-random number in [0, 1) from its key (same on every run and machine)."""
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def synthetic_table(inventory: ModelInventory) -> Table:
    """Every quantizable tensor with every candidate type (fallbacks applied, no IQ for token_embd),
    exact bytes, and an error that halves about every 0.5 bpw with a per-(tensor, type) jitter, so the
    candidate lists are neither convex nor equal across tensors."""
    entries = []
    for info in inventory.tensors:
        if not info.quantizable:
            continue
        cands = []
        for t in for_tensor(info, has_imatrix=info.name != "token_embd.weight"):
            weight = 1.0 + 4.0 * _jitter(info.name)
            error = info.n_rows * weight * 2.0 ** (-2.0 * nominal_bpw(t)) * (0.7 + 0.6 * _jitter(info.name, t))
            cands.append(Cand(t, info.bytes_as(t), error))
        entries.append(Entry(info.name, info.n_elements, tuple(cands)))
    return Table(tuple(entries))
