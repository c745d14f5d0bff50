"""What an evaluator is given: the quantized model, the baseline's logits, the recipe's datasets, and the
llama-perplexity modes to run on them (with the run's threads and GPU offload already applied)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

from tbpw.data.files import DatasetFile, DatasetKind
from tbpw.errors import TbpwError

if TYPE_CHECKING:
    from tbpw.llamacpp.parsers import HellaswagResult, KldResult, TaskScore
    from tbpw.llamacpp.perplexity import TaskMode


@dataclass(frozen=True)
class EvalContext:
    model: Path
    log_dir: Path  # tool logs go here (one per evaluator)
    base_logits: Path | None = None
    datasets: dict[str, DatasetFile] = field(default_factory=dict)
    ctx: int = 512  # context of the perplexity / KL divergence runs
    chunks: int | None = None
    task_ctx: int = 768  # context of the task runs (HellaSwag, WinoGrande, multiple choice)
    ngl: int | None = None  # GPU layers; None: all when the build has a GPU backend
    threads: int | None = None

    def dataset(self, role: str, kind: DatasetKind) -> DatasetFile:
        """The recipe's dataset for `role`, which must be a file of `kind`."""
        ds = self.datasets.get(role)
        if ds is None:
            raise TbpwError(f"this evaluator needs datasets.{role} in the recipe: add it or drop the evaluator")
        if ds.kind != kind:
            raise TbpwError(f"datasets.{role} gives a {ds.kind} file, the evaluator reads {kind}: pick a {kind} dataset")
        return ds

    def kl_divergence(self, log_name: str = "kld.log") -> KldResult:
        """Perplexity, KL divergence and token statistics of the model against the baseline's logits."""
        from tbpw.llamacpp.perplexity import kl_divergence

        if self.base_logits is None:
            raise TbpwError("KL divergence needs the baseline logits: run the baseline stage first")
        result, _ = kl_divergence(self.model, self.base_logits, ctx=self.ctx, chunks=self.chunks,
                                  threads=self.threads, ngl=self.ngl, log_path=self.log_dir / log_name)
        return result

    @overload
    def task(self, mode: Literal["hellaswag"], role: str, tasks: int) -> HellaswagResult: ...
    @overload
    def task(self, mode: Literal["winogrande", "multiple-choice"], role: str, tasks: int) -> TaskScore: ...
    def task(self, mode: TaskMode, role: str, tasks: int) -> HellaswagResult | TaskScore:
        """Accuracy on the recipe's dataset `role` in a llama-perplexity task mode."""
        from tbpw.llamacpp.perplexity import task

        kind: DatasetKind = "multiple-choice" if mode == "multiple-choice" else mode
        return task(self.model, mode, self.dataset(role, kind).path, tasks=tasks, ctx=self.task_ctx,
                    threads=self.threads, ngl=self.ngl, log_path=self.log_dir / f"{role}.log")
