"""What every stage of a run shares: its run directory, the llama.cpp build, its log, and the services a worker
makes once (the tensor store, the calibration scorers, the plugin registry).

`RunSettings` is the part of a recipe the context needs, small and picklable: the driver makes it once
(tbpw.run.pipeline) and every task carries it, so that any worker makes the same context (`StageTask`). A stage
step gets a `StageContext` and its own inputs and options, never the recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tbpw.allocate.constraints import Constraints
from tbpw.allocate.service import Planner
from tbpw.data.files import DatasetFile
from tbpw.errors import TbpwError
from tbpw.llamacpp import progress
from tbpw.llamacpp.build import active_build
from tbpw.options import PluginRef
from tbpw.stages.rundir import RunDir, StageOutcome

if TYPE_CHECKING:
    from tbpw.plugin.manager import PluginManager
    from tbpw.quantize.store import TensorStore
    from tbpw.select.scoring import Scorer

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunSettings:
    """What every stage of one run shares, from its recipe."""

    output_dir: Path
    force: frozenset[str] = frozenset()  # stages (or stage-name prefixes) to run again though finished
    label: str = ""  # the run's label within a sweep: every line its stages log starts with it
    ngl: int | None = None  # GPU layers of every tool run that loads a model (None: all on a GPU build)
    threads: int | None = None  # the tensor store's and the scorers' threads
    store: bool = True  # assemble quants from the tensor store (else llama-quantize writes each)
    # ctx -> chunks: one set of float logits on the calibration text per ctx, as long as its longest user needs
    scorer_chunks: Mapping[int, int] = field(default_factory=dict)
    # what every GGUF of the run records besides what the planner knows (tbpw.model.provenance): metric, recipe hash
    provenance: Mapping[str, str] = field(default_factory=dict)

    def forced(self, stage: str) -> bool:
        return stage in self.force or any(stage.startswith(f"{f}-") for f in self.force)


class StageContext:
    """One worker's view of a run: `stage()` runs (or skips) a stage in the run directory; the rest are the services
    the stage steps share. `claim`: hold the run directory (the driver); None: only plan, never open it."""

    def __init__(self, settings: RunSettings, log: Log = print, *, claim: bool | None = False):
        self.settings = settings
        self.log = log
        self._claim = claim
        self._scorers: dict[int, Scorer] = {}

    @cached_property
    def build(self):
        return active_build()

    @cached_property
    def run_dir(self) -> RunDir:
        if self._claim is None:
            raise TbpwError("a pipeline made only to plan runs no stage: make it with claim=True")
        return RunDir(self.settings.output_dir, claim=self._claim)

    @cached_property
    def plugins(self) -> PluginManager:
        """The registry the stages make plugin instances from (the recipe names them; the floors below the stages
        are handed the instances)."""
        from tbpw.plugin.manager import get_manager

        return get_manager()

    def plugin(self, kind: str, ref: PluginRef) -> Any:
        return self.plugins.registry(kind).create(ref.name, ref.options)

    @cached_property
    def store(self) -> TensorStore | None:
        """The tensor store every quant of the run is assembled from (None: llama-quantize writes each)."""
        if not self.settings.store:
            return None
        from tbpw.quantize.store import TensorStore

        return TensorStore(threads=self.settings.threads)

    def scorer(self, model: Path, imatrix: Path, text: DatasetFile, ctx: int) -> Scorer:
        """One set of float logits on the calibration text (per ctx) and its kept scores, shared by calibrate and
        every target's choice; it holds as many chunks as either of them asks for."""
        if ctx not in self._scorers:
            from tbpw.select.scoring import Scorer

            self._scorers[ctx] = Scorer(model, text.path, imatrix=imatrix, ctx=ctx,
                                        chunks=self.settings.scorer_chunks.get(ctx, 0), threads=self.settings.threads,
                                        ngl=self.settings.ngl, log=lambda line: self.log(f"  scoring{line}"))
        return self._scorers[ctx]

    def provenance(self, calibration: DatasetFile) -> dict[str, str]:
        """What every GGUF the run writes records besides what the Planner knows (tbpw.model.provenance)."""
        return {**self.settings.provenance, "calibration": calibration.description or calibration.path.name,
                "calibration_sha256": self.run_dir.fingerprint(calibration.path)}

    def planner(self, model: Path, imatrix: Path, folder: Path, constraints: Constraints,
                calibration: DatasetFile) -> Planner:
        return Planner(model, imatrix, constraints, log_dir=folder, provenance=self.provenance(calibration),
                       store=self.store)

    def stage(self, name: str, inputs: Mapping[str, Path], options: Any, body: Callable[[Path], dict], *,
              quiet: bool = False) -> StageOutcome:
        """Run (or skip, when finished) one stage; `quiet`: say nothing of a skipped one (a stage looked up again)."""
        with progress.stage(name):
            outcome = self.run_dir.run(name, inputs, {"options": options, "build": self.build.key}, body,
                                       force=self.settings.forced(name))
        if not (quiet and outcome.skipped):
            self.log(f"{'skip' if outcome.skipped else 'done'}  {name}" + ("" if outcome.skipped else f"  ({outcome.seconds:.1f} s)"))
        return outcome

    def close(self) -> None:
        """Release the run directory (the driver does at its end) for the next run."""
        if "run_dir" in self.__dict__:
            self.run_dir.close()


@dataclass(frozen=True)
class StageTask:
    """A task's call: one stage step with the run's settings. Picklable (the step is a module-level function), so
    any worker can run it: it makes its own context there and logs through the worker's `log`."""

    settings: RunSettings
    step: Callable[..., Any]

    def __call__(self, *args: Any, log: Log, **kwargs: Any) -> Any:
        label = self.settings.label
        say = (lambda line: log(f"{label}: {line}")) if label else log
        return self.step(StageContext(self.settings, say, claim=False), *args, **kwargs)
