"""The base classes plugins extend: allocator, error metric, dataset, evaluator and executor.

A plugin class names itself (``name``), says in one line what it does (``description``) and declares
its options as a pydantic model (``Options``, ``extra="forbid"`` so that a typo names the real fields).
tbpw validates a recipe's options with that model and builds the plugin as ``Class(options)``; the base
``__init__`` keeps them as ``self.options``. Every method below that is not abstract has a default, so
a plugin overrides only what it needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import numpy as np

    from tbpw.allocate.problem import AllocationProblem
    from tbpw.data.files import DatasetContext, DatasetFile, DatasetKind
    from tbpw.evaluate.context import EvalContext
    from tbpw.jobs import Job, JobEvent
    from tbpw.measure.slices import ColumnStats, MeasureSetup, MetricContext, TensorSample


class NoOptions(BaseModel):
    """For plugins without options: any key given is an error."""

    model_config = ConfigDict(extra="forbid")


class PluginOptions(BaseModel):
    """Base for plugin options: unknown keys are errors, so a typo names the plugin's real fields."""

    model_config = ConfigDict(extra="forbid")


class Plugin(ABC):
    """What every plugin class has: a name, a one-line description, an options model."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    # The one plugin of its kind a recipe gets when it names none (a built-in's choice; leave it False).
    default: ClassVar[bool] = False

    def __init__(self, options: BaseModel | None = None) -> None:
        self.options: Any = options if options is not None else self.Options()

    def check_ready(self) -> None:
        """Raise ``TbpwError`` (one line: the cause and the fix) when this plugin cannot run here, e.g.
        because the active llama.cpp build lacks a tool option it needs, or a file it reads is missing or not
        of its kind. Called by ``tbpw validate`` and before a run's first stage, so cheap checks only."""


class Allocator(Plugin):
    """Turns an allocation problem into a type per decidable tensor within the byte budget. Pure: no I/O."""

    @abstractmethod
    def allocate(self, problem: AllocationProblem) -> dict[str, str]:
        """Return tensor name -> ggml type name (one of that tensor's candidates) within ``problem.budget``."""


class ErrorMetric(Plugin):
    """Scores sampled rows of a tensor against their quantized reconstruction.

    For each slice (expert) and candidate type tbpw calls ``prepare_rows`` on the sampled rows, quantizes
    and dequantizes what it returns (with the raw E[a^2] as importance), and calls ``slice_error`` with the
    rows as sampled (``original``) and the reconstruction.
    """

    def setup(self, setup: MeasureSetup) -> None:
        """Called once before any tensor is measured (e.g. to rank tensors by imatrix statistics)."""

    def prepare_rows(self, rows: np.ndarray, context: MetricContext) -> np.ndarray:
        """Rows to quantize for this candidate (most metrics return them unchanged)."""
        return rows

    @abstractmethod
    def slice_error(self, original: np.ndarray, reconstructed: np.ndarray, stats: ColumnStats,
                    context: MetricContext) -> float:
        """The error of one slice; tbpw adds the slices of a 3-D tensor."""

    def tensor_factor(self, sample: TensorSample, context: MetricContext) -> float:
        """A multiplier of every candidate's error of one tensor (e.g. from the sampled weights' conditioning)."""
        return 1.0


class Dataset(Plugin):
    """Produces calibration/evaluation text or a task file in a format llama-perplexity reads."""

    @abstractmethod
    def materialize(self, context: DatasetContext) -> DatasetFile:
        """Fetch or build the file into ``context.cache_dir`` (verified) and describe it."""

    def kind(self) -> DatasetKind | None:
        """The kind of file ``materialize`` will give, when known without fetching anything (recipes are
        checked with it before a run starts); None when only the file itself can tell."""
        return None


@dataclass(frozen=True)
class Column:
    """One number an evaluator reports: how the report shows it and how to rank quants by it."""

    key: str  # the key in the evaluator's result dict
    label: str  # the report's column header
    lower_is_better: bool | None = None  # None: not a quality ranking (a count, a reference value)
    table: Literal["quality", "tasks", "none"] = "quality"  # where the report shows it
    digits: int = 4
    suffix: str = ""  # e.g. "%"
    error_key: str | None = None  # the key of its ± uncertainty, when the tool reports one

    @property
    def rankable(self) -> bool:
        return self.lower_is_better is not None


class Evaluator(Plugin):
    """Scores a quantized model (perplexity, KL divergence, tasks) and returns flat named numbers.

    ``columns`` says what those numbers are (the report's columns, which of them rank quants);
    ``dataset_roles`` says which recipe datasets it reads and of which kind.
    """

    columns: ClassVar[tuple[Column, ...]] = ()

    @abstractmethod
    def evaluate(self, context: EvalContext) -> dict[str, float]:
        """Run the tools on ``context.model`` and return ``{column key: value}``."""

    def output_columns(self) -> tuple[Column, ...]:
        """The columns this instance reports (override when they depend on the options)."""
        return self.columns

    def dataset_roles(self) -> dict[str, DatasetKind]:
        """Recipe dataset role -> the file kind it must be (e.g. ``{"hellaswag": "hellaswag"}``)."""
        return {}

    def baseline_values(self, ppl: float, ppl_error: float) -> dict[str, float]:
        """This evaluator's numbers for the float model itself, from its perplexity on the evaluation text
        (the baseline row of the report); most evaluators have none."""
        return {}

    def ranking(self) -> tuple[str, ...]:
        """The columns that pick the best quant of a target when the recipe names none, most important first."""
        return tuple(c.key for c in self.output_columns() if c.rankable)


class Executor(Plugin):
    """Runs the jobs of a run's task graph: one after another, in a local pool, or on a cluster.

    tbpw's scheduler (``tbpw.run.execute``) hands the executor every job whose dependencies have finished
    (``submit``) and asks what happened since (``poll``); the executor decides when and where each job starts,
    within its capacity and the job's ``resources`` (``gpu``, ``memory``, ``exclusive``). A job is picklable;
    running it is ``job.execute(log, slot)``, where ``slot`` (a ``tbpw.ToolSlot``) gives its llama.cpp tools
    their thread count and GPUs. A job's result is small (paths and numbers): its files stay in the run
    directory, which every worker must see at the same path.
    """

    def open(self, log: Callable[[str], None]) -> None:
        """Called once before the first job: start a pool, connect to a cluster. ``log`` prints a line."""

    def describe(self) -> str:
        """One line for the run's log: where jobs run and how many at once."""
        return self.name

    @abstractmethod
    def submit(self, job: Job) -> None:
        """Queue ``job``; it starts when the executor has room for it."""

    @abstractmethod
    def poll(self, timeout: float) -> list[JobEvent]:
        """Wait up to ``timeout`` seconds and return what happened since the last call: jobs started, done
        (with their result) or failed (with their exception; a ``TbpwError`` as it was raised)."""

    def cancel(self) -> None:
        """Stop every queued and running job (Ctrl-C, or another job failed). A stopped job leaves no stage
        that looks finished, so the next run starts it again."""

    def close(self) -> None:
        """Called once after the last job, also after a failure: release pools and connections."""


PLUGIN_BASES: dict[str, type[Plugin]] = {"allocator": Allocator, "metric": ErrorMetric, "dataset": Dataset,
                                         "evaluator": Evaluator, "executor": Executor}

__all__ = ["Allocator", "Column", "Dataset", "ErrorMetric", "Evaluator", "Executor", "NoOptions", "PLUGIN_BASES",
           "Plugin", "PluginOptions"]
