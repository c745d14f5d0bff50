"""The shapes plugins fill: what an allocator, a metric, a dataset and an evaluator look like.

These are Protocols: a plugin class needs the attributes and methods, not a base class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from .allocate import AllocationProblem


class NoOptions(BaseModel):
    """For plugins without options: any key given is an error."""

    model_config = ConfigDict(extra="forbid")


class PluginOptions(BaseModel):
    """Base for plugin options: unknown keys are errors, so a typo names the plugin's real fields."""

    model_config = ConfigDict(extra="forbid")


@runtime_checkable
class Plugin(Protocol):
    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type[BaseModel]]


class Allocator(Plugin, Protocol):
    def __init__(self, options: Any) -> None: ...

    def allocate(self, problem: "AllocationProblem") -> dict[str, str]:
        """Return tensor name -> ggml type name (one of that tensor's candidates) within the budget."""


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

    inventory: Any  # tbpw.gguf_model.ModelInventory
    imatrix: Any | None  # tbpw.imatrix.Imatrix, or None without an imatrix
    tensors: tuple[str, ...]  # the tensors about to be measured


@dataclass(frozen=True)
class TensorSample:
    """All sampled rows of one tensor, slice by slice (optional `ErrorMetric.tensor_factor`)."""

    tensor: str
    role: str
    n_cols: int
    n_rows: int  # sampled rows over all slices
    blocks: Callable[[], Iterator[np.ndarray]]  # each call yields the float32 rows of every slice again


class ErrorMetric(Plugin, Protocol):
    """Scores sampled rows of a tensor against their quantized reconstruction.

    For each slice (expert) and candidate type tbpw calls ``prepare_rows`` on the sampled rows, quantizes
    and dequantizes what it returns (with the raw E[a^2] as importance), and calls ``slice_error`` with
    the rows as sampled (``original``) and the reconstruction. Two optional methods, used when present:
    ``setup(MeasureSetup)`` once before measuring (e.g. to rank tensors by imatrix statistics), and
    ``tensor_factor(TensorSample, MetricContext) -> float``, a multiplier of every candidate's error of
    that tensor (e.g. from the sampled weights' conditioning).
    """

    def __init__(self, options: Any) -> None: ...

    def prepare_rows(self, rows: np.ndarray, context: MetricContext) -> np.ndarray:
        """Rows to quantize for this candidate (most metrics return them unchanged)."""

    def slice_error(self, original: np.ndarray, reconstructed: np.ndarray, stats: ColumnStats,
                    context: MetricContext) -> float:
        """The error of one slice; tbpw adds the slices of a 3-D tensor."""


DatasetKind = Literal["text", "hellaswag", "winogrande", "multiple-choice"]


@dataclass(frozen=True)
class DatasetFile:
    path: Path
    kind: DatasetKind
    description: str = ""  # shown in reports; substitutes say so here
    attribution: str = ""  # licence notice that travels with redistributed data


@dataclass(frozen=True)
class DatasetContext:
    cache_dir: Path  # where fetched and derived files go
    offline: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Dataset(Plugin, Protocol):
    def __init__(self, options: Any) -> None: ...

    def materialize(self, context: DatasetContext) -> DatasetFile: ...


class Evaluator(Plugin, Protocol):
    def __init__(self, options: Any) -> None: ...

    def evaluate(self, context: Any) -> dict[str, float]: ...


@dataclass(frozen=True)
class EvalContext:
    """What an evaluator gets: the quantized model, the baseline's saved logits, the recipe's datasets."""

    model: Path
    log_dir: Path  # write tool logs here (one per evaluator)
    base_logits: Path | None = None
    datasets: dict[str, DatasetFile] = field(default_factory=dict)
    ctx: int = 512
    chunks: int | None = None
    task_ctx: int = 768
    tasks: dict[str, int] = field(default_factory=dict)  # evaluator/dataset name -> number of tasks
    ngl: int | None = None
    threads: int | None = None
