"""What an error metric is given about the rows it scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class ColumnStats:
    """Importance statistics of the input columns of one tensor slice (one expert of a 3-D tensor)."""

    sq: np.ndarray | None = None  # E[a^2] per column (raw; metrics may winsorise their own copy)
    mean: np.ndarray | None = None  # E[a] per column, when the imatrix recorded activation sums


@dataclass(frozen=True)
class MetricContext:
    tensor: str  # full tensor name, e.g. "blk.3.attn_q.weight"
    role: str  # e.g. "attn_q", "ffn_down_exps", "token_embd"
    type: str  # candidate ggml type name
    nominal_bpw: float  # the type's bits per weight when the row fits its blocks
    slice_rows: int  # rows of the whole slice (ne1), of which `original` is a sample
    expert: int | None = None


@dataclass(frozen=True)
class MeasureSetup:
    """What a metric may look at once, before any tensor is measured (optional `ErrorMetric.setup`)."""

    inventory: Any  # tbpw.model.inventory.ModelInventory
    imatrix: Any | None  # tbpw.imatrix.reader.Imatrix, or None without an imatrix
    tensors: tuple[str, ...]  # the tensors about to be measured


@dataclass(frozen=True)
class TensorSample:
    """All sampled rows of one tensor, slice by slice (optional `ErrorMetric.tensor_factor`)."""

    tensor: str
    role: str
    n_cols: int
    n_rows: int  # sampled rows over all slices
    blocks: Callable[[], Iterator[np.ndarray]]  # each call yields the float32 rows of every slice again



class MetricPlugin(Protocol):
    """What the measurement uses of an error metric: an instance of the plugin contract `tbpw.ErrorMetric`
    (tbpw.plugin.base), which a caller above this floor makes from its name and options and hands in."""

    @property
    def name(self) -> str: ...

    @property
    def options(self) -> Any: ...

    def setup(self, setup: MeasureSetup) -> None: ...

    def prepare_rows(self, rows: np.ndarray, context: MetricContext) -> np.ndarray: ...

    def slice_error(self, original: np.ndarray, reconstructed: np.ndarray, stats: ColumnStats,
                    context: MetricContext) -> float: ...

    def tensor_factor(self, sample: TensorSample, context: MetricContext) -> float: ...
