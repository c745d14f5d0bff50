"""Per-row error arithmetic the metrics share: trimmed means, winsorised weights, clipping.
"""

from __future__ import annotations

import numpy as np

EPSILON = 1e-12


def trimmed_mean(values: np.ndarray, fraction: float) -> float:
    """Mean without the `fraction` smallest and largest values (from 100 values on, as the fork does)."""
    n = values.size
    if n == 0:
        return 0.0
    if fraction <= 0 or n < 100:
        return float(values.sum() / n)
    k = int(n * fraction)
    kept = np.sort(values)[k:n - k] if k else values
    return float(kept.sum() / max(1.0, float(n - 2 * k)))


def winsorize(sq: np.ndarray) -> np.ndarray:
    """Cap E[a^2] at exp(median(ln v) + 4 * 1.4826 * MAD(ln v)) over its positive entries (float32, as the fork).

    Left alone when fewer than 8, or fewer than half, of the entries are positive, or when the MAD is ~0.
    The fork takes the upper median (element n/2 of the sorted values) for both statistics.
    """
    sq = np.asarray(sq, dtype=np.float32)
    positive = sq[sq > 0]
    if positive.size < 8 or positive.size < sq.size // 2:
        return sq
    logs = np.log(positive).astype(np.float32)
    mid = logs.size // 2
    med = np.float32(np.partition(logs, mid)[mid])
    dev = np.abs(logs - med).astype(np.float32)
    mad = np.float32(np.partition(dev, mid)[mid])
    if mad <= np.float32(1e-6) * max(np.float32(1.0), abs(med)):
        return sq
    cap = np.exp(np.float32(med + np.float32(4.0) * np.float32(1.4826) * mad), dtype=np.float32)
    return np.minimum(sq, cap)


def relative_rows(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den per row; 0 where den <= 1e-12; infinity where the ratio is not finite."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > EPSILON, num / np.where(den > EPSILON, den, 1.0), 0.0)
    return np.where(np.isfinite(out), out, np.inf)


def cosine_error(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Mean over rows of 1 - cos_w(x, y), the cosine under the inner product sum_j w_j a_j b_j."""
    dot = (x * y) @ w
    nx = (x * x) @ w
    ny = (y * y) @ w
    prod = nx * ny
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(prod > EPSILON, dot / np.sqrt(np.where(prod > EPSILON, prod, 1.0)),
                       np.where((nx <= EPSILON) & (ny <= EPSILON), 1.0, 0.0))
    cos = np.clip(cos, -1.0, 1.0)
    return float((1.0 - cos).sum() / max(1, cos.size))


def clip_rows(rows: np.ndarray, sigma: float) -> np.ndarray:
    """Each row clamped to its mean +- sigma * std (float32, as the fork; rows with a tiny spread are kept)."""
    r = np.asarray(rows, dtype=np.float32)
    mean = r.astype(np.float64).mean(axis=1).astype(np.float32)
    var = r.astype(np.float64).var(axis=1).astype(np.float32)
    clip = (np.float32(sigma) * np.sqrt(np.maximum(var, np.float32(0.0)))).astype(np.float32)
    lo = (mean - clip)[:, None]
    hi = (mean + clip)[:, None]
    clipped = np.minimum(np.maximum(r, lo), hi)
    return np.where((clip > np.float32(1e-4))[:, None], clipped, r).astype(np.float32)

