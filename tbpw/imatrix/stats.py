"""Per-tensor statistics of an importance matrix, computed from the file (llama-imatrix's own
`--show-statistics` loses its output at random in the pinned build).

For every weight, over the E[a^2] values of its input columns (all experts that saw tokens):
sum, min, max, mean, standard deviation, the fraction of active columns (E[a^2] > 1e-5), the entropy
of the distribution p = E[a^2] / sum (bits, and relative to log2 of the number of values), the share
of values more than one standard deviation above the mean, and the cosine similarity with the same
weight of the previous layer. These are the quantities llama-imatrix prints; they agree with its
output to the printed digits (for the cosine: exactly for dense weights; for experts tbpw compares
E[a^2], llama-imatrix the raw sums). With an E[a]-carrying imatrix, the mean and standard deviation
of E[a] are added.

    stats = tensor_statistics(Imatrix.load("model.imatrix.gguf"))
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np

from tbpw.imatrix.reader import Imatrix

ACTIVE_THRESHOLD = 1e-5  # what llama-imatrix counts as an inactive column
_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorStats:
    name: str
    layer: int | None
    elements: int  # values the statistics are over (columns x experts that saw tokens)
    experts: int
    experts_seen: int
    sum: float
    min: float
    max: float
    mean: float
    std: float
    active: float  # fraction of values above ACTIVE_THRESHOLD
    entropy: float  # bits
    entropy_norm: float  # entropy / log2(elements), 0..1
    zd: float  # fraction of values with z-score above 1
    cossim: float | None  # with the same weight one layer earlier; None when there is none
    ea_mean: float | None  # mean of E[a] over the same values; None without in_sum
    ea_std: float | None

    def to_json(self) -> dict:
        return asdict(self)


def layer_of(name: str) -> int | None:
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else None


def previous_layer_name(name: str) -> str | None:
    m = _BLOCK.match(name)
    if not m or int(m.group(1)) == 0:
        return None
    return f"blk.{int(m.group(1)) - 1}." + name[m.end():]


def distribution_stats(values: np.ndarray) -> dict[str, float]:
    """Statistics of one tensor's E[a^2] values (1-D, non-empty)."""
    v = np.asarray(values, dtype=np.float64)
    total = float(v.sum())
    mean = total / v.size
    std = math.sqrt(max(0.0, float(np.mean(v * v)) - mean * mean))
    entropy = 0.0
    if total > 0:
        p = v / total
        p = p[p > 0]
        entropy = float(-(p * np.log2(p)).sum())
    zd = float(np.count_nonzero((v - mean) / std > 1)) / v.size if std > 0 else 0.0
    return {"sum": total, "min": float(v.min()), "max": float(v.max()), "mean": mean, "std": std,
            "active": 1.0 - float(np.count_nonzero(np.abs(v) <= ACTIVE_THRESHOLD)) / v.size,
            "entropy": entropy, "entropy_norm": entropy / math.log2(v.size) if v.size > 1 else 0.0, "zd": zd}


def cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.size != b.size:
        return None
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norm if norm > 0 else None


def tensor_statistics(imx: Imatrix) -> list[TensorStats]:
    """Statistics of every tensor in the file, ordered by layer then name (non-block tensors last)."""
    seen_sq: dict[str, np.ndarray] = {}
    for name in imx.names():
        sq = imx.sq(name).astype(np.float64)
        sq[imx.counts(name) <= 0] = 0.0  # experts without tokens: no information, not the placeholder 1
        seen_sq[name] = sq
    out = []
    for name in sorted(imx.names(), key=lambda n: (layer_of(n) is None, layer_of(n) or 0, n)):
        seen = imx.counts(name) > 0
        if not seen.any():
            continue
        values = seen_sq[name][seen].ravel()
        prev = previous_layer_name(name)
        mean_a = imx.mean(name)
        ea = mean_a[seen].astype(np.float64).ravel() if mean_a is not None else None
        out.append(TensorStats(
            name=name, layer=layer_of(name), elements=int(values.size), experts=int(seen.size),
            experts_seen=int(seen.sum()), **distribution_stats(values),
            cossim=cosine(seen_sq[name], seen_sq[prev]) if prev in seen_sq else None,
            ea_mean=float(ea.mean()) if ea is not None else None,
            ea_std=float(ea.std()) if ea is not None else None))
    return out
