"""The fork's two per-tensor error multipliers, both used only when the imatrix carries its `.stats`.

- CNIF ("centred normalised importance factor"): every decidable tensor except token_embd/output gets a
  score from its imatrix statistics (concentration 1 - h_norm/100, density l2/(sqrt(energy)+l2),
  fragility from cossim and pearson), separately for cosine-scored tensors (attn_q/attn_k-like, with
  E[a]) and the rest; a robust z-score (median, 1.4826 MAD, clamped to +-4) maps to exp(beta tanh(0.8 z))
  with beta 0.40 (rest) and 0.25 (cosine); under 8 tensors, or with no spread, a rank maps to
  exp(beta (2p - 1)).
- condition number: kappa = sigma_1 / sigma_20 of the row-normalised sampled weights, estimated with a
  randomised SVD (Halko-Martinsson-Tropp, rank 25, one power iteration, Gaussian test matrix from
  std::mt19937 seeded by the shape); factor 1 + 4 tanh(0.15 ln kappa), 5 when kappa is infinite.

Both are hand-tuned heuristics of the fork, reproduced so its numbers can be checked; the `fork` metric
can switch each off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from tbpw import MT19937, normal_float32

_EPSILON = 1e-12
_MASK64 = (1 << 64) - 1


def is_angle_sensitive(name: str) -> bool:
    """Tensors the fork scores with a weighted cosine error (when E[a^2] and E[a] both exist)."""
    return any(s in name for s in ("attn_q.weight", "attn_k.weight", "attn_qkv.weight", "attn_q_a.weight", "attn_q_b.weight"))


def is_inner_product_sensitive(name: str) -> bool:
    """Tensors whose error the fork raises at low bpw by 1 + 0.5 * 2^(3 - bpw)."""
    return any(s in name for s in ("attn_q", "attn_k", "attn_o", "attn_v"))


def is_head(name: str) -> bool:
    return name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight")


# ----- CNIF -----

def _corr_error(x: float) -> float:
    if not math.isfinite(x):
        return 0.0
    return 1.0 - abs(min(max(x, -1.0), 1.0))


def cnif_score(stats: Mapping[str, float], cosine: bool) -> float:
    """The fork's fragility score of one tensor from its imatrix statistics."""
    h = stats.get("h_norm", float("nan"))
    h_norm = min(max(h, 0.0), 100.0) if math.isfinite(h) else 100.0
    concentration = 1.0 - h_norm / 100.0
    e = stats.get("sum_sq", float("nan"))
    energy = max(0.0, e) if math.isfinite(e) else 0.0
    d = stats.get("l2_dist", float("nan"))
    l2 = max(0.0, d) if math.isfinite(d) else 0.0
    rel_l2 = float(np.float32(l2 / (math.sqrt(energy) + _EPSILON)))
    density = rel_l2 / (1.0 + rel_l2)
    fragility = 0.5 * (_corr_error(stats.get("cossim", float("nan"))) + _corr_error(stats.get("pearson", float("nan"))))
    if cosine:
        score = 0.75 * concentration + 0.15 * density + 0.10 * fragility
    else:
        score = 0.40 * concentration + 0.35 * density + 0.25 * fragility
    return float(np.float32(score))


def _median(values: list[float]) -> float:
    mid = len(values) // 2
    if len(values) % 2:
        return values[mid]
    return 0.5 * (values[mid - 1] + values[mid])


def _rank(scores: list[tuple[float, str]], beta: float, out: dict[str, float]) -> None:
    if not scores:
        return
    scores = sorted(scores)
    if len(scores) == 1:
        out[scores[0][1]] = 1.0
        return
    i = 0
    while i < len(scores):
        j = i + 1
        while j < len(scores) and abs(scores[j][0] - scores[i][0]) <= 1e-6:
            j += 1
        p = 0.5 * (i + j - 1) / (len(scores) - 1)
        scale = math.exp(beta * (2.0 * p - 1.0))
        for k in range(i, j):
            out[scores[k][1]] = scale
        i = j


def _cnif_group(scores: list[tuple[float, str]], beta: float, out: dict[str, float]) -> None:
    if len(scores) < 8:
        _rank(scores, beta, out)
        return
    scores = sorted(scores)
    med = _median([s for s, _ in scores])
    mad = _median(sorted(abs(s - med) for s, _ in scores))
    if mad <= 1e-6:
        _rank(scores, beta, out)
        return
    inv_scale = 1.0 / (1.4826 * mad + 1e-6)
    for s, name in scores:
        z = min(max((s - med) * inv_scale, -4.0), 4.0)
        out[name] = math.exp(beta * math.tanh(0.8 * z))


def cnif_factors(stats: Mapping[str, Mapping[str, float]], cosine: Mapping[str, bool]) -> dict[str, float]:
    """CNIF of every named tensor with statistics (token_embd/output excluded: they stay at 1)."""
    mse_scores: list[tuple[float, str]] = []
    wce_scores: list[tuple[float, str]] = []
    for name, st in stats.items():
        if is_head(name) or "l2_dist" not in st:
            continue
        use_cos = cosine.get(name, False)
        (wce_scores if use_cos else mse_scores).append((cnif_score(st, use_cos), name))
    out: dict[str, float] = {}
    _cnif_group(mse_scores, 0.40, out)
    _cnif_group(wce_scores, 0.25, out)
    return out


# ----- condition number -----

_RANK = 25
_K = 20


def squash_kappa(kappa: float) -> float:
    """Map kappa in [1, inf] to a multiplier in [1, 5]."""
    if not math.isfinite(kappa):
        return 5.0
    return 1.0 + 4.0 * math.tanh(0.15 * math.log(kappa))


def condition_number(blocks: Callable[[], Iterator[np.ndarray]], n_cols: int) -> float:
    """sigma_1 / sigma_20 of the row-normalised rows that `blocks()` yields, as the fork estimates it.

    Streams over the rows a few times instead of holding them all (a MoE tensor's sample can be large).
    """
    inv_norms: list[np.ndarray] = []
    for block in blocks():
        b = np.asarray(block, dtype=np.float64)
        finite = np.all(np.isfinite(b), axis=1)  # a row with NaN/inf is left out, as the fork does
        clean = np.where(finite[:, None], b, 0.0)
        l2 = np.sqrt(np.einsum("ij,ij->i", clean, clean))
        valid = finite & (l2 > 1e-8)
        inv_norms.append(np.where(valid, 1.0 / np.where(valid, l2, 1.0), 0.0))
    inv = np.concatenate(inv_norms) if inv_norms else np.zeros(0)
    valid_m = int(np.count_nonzero(inv))
    if valid_m < 2:
        return math.inf

    def normalised() -> Iterator[np.ndarray]:
        start = 0
        for block in blocks():
            b = np.asarray(block, dtype=np.float64)
            scale = inv[start:start + b.shape[0]]
            start += b.shape[0]
            keep = scale > 0
            yield b[keep] * scale[keep, None]

    n = n_cols
    seed = (n * 0x9E3779B97F4A7C15 + valid_m * 0xBF58476D1CE4E5B9) & _MASK64
    if valid_m >= _RANK:
        omega = normal_float32(MT19937(seed), n * _RANK).astype(np.float64).reshape(n, _RANK)
        z = np.zeros((n, _RANK))
        for a in normalised():
            z += a.T @ (a @ omega)
        y1 = np.concatenate([a @ z for a in normalised()])
        q = _mgs_qr(y1)
        b = np.zeros((_RANK, n))
        start = 0
        for a in normalised():
            b += q[start:start + a.shape[0]].T @ a
            start += a.shape[0]
        eig = np.linalg.eigvalsh(b @ b.T)
    else:
        a = np.concatenate(list(normalised()))
        if n >= _RANK:
            omega = normal_float32(MT19937(seed), valid_m * _RANK).astype(np.float64).reshape(valid_m, _RANK)
            y1 = a.T @ (a @ (a.T @ omega))
            q = _mgs_qr(y1)
            b = q.T @ a.T
            eig = np.linalg.eigvalsh(b @ b.T)
        else:
            eig = np.linalg.eigvalsh(a @ a.T if valid_m <= n else a.T @ a)
    eig = np.sort(eig)[::-1]
    if eig.size < _K:
        return math.inf
    sigma_max = math.sqrt(max(0.0, float(eig[0])))
    sigma_min = math.sqrt(max(0.0, float(eig[_K - 1])))
    if sigma_min <= _EPSILON:
        return math.inf
    return sigma_max / sigma_min


def _mgs_qr(y: np.ndarray) -> np.ndarray:
    """Modified Gram-Schmidt; a column whose remainder vanishes (norm <= 1e-8) stays zero, as in the fork."""
    q = np.zeros_like(y)
    for j in range(y.shape[1]):
        v = y[:, j].copy()
        for b in range(j):
            v -= (v @ q[:, b]) * q[:, b]
        norm = math.sqrt(float(v @ v))
        if norm > 1e-8:
            q[:, j] = v / norm
    return q
