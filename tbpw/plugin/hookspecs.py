"""Every hook a tbpw plugin can implement. This file is the whole plugin contract.

A plugin is a module (or object) with functions marked ``@tbpw.hookimpl``, made known through an entry
point in the ``tbpw`` group of its package metadata::

    [project.entry-points.tbpw]
    my_allocator = "my_package.my_module"

tbpw's own allocators, metrics, datasets, evaluators and executors are registered exactly this way (``plugins/`` in
the repository, installed as ``tbpw_plugins``), and tbpw's own subcommands through the same
``tbpw_register_commands`` hook a plugin uses. A plugin imports what it needs from ``tbpw`` alone.

Collector hooks (``tbpw_register_*``) receive a ``register`` callable. Call it once per class you provide;
the class extends one of the base classes ``tbpw.Allocator``, ``tbpw.ErrorMetric``, ``tbpw.Dataset``,
``tbpw.Evaluator``, ``tbpw.Executor`` (``tbpw.plugin.base``) and describes itself with class attributes:

- ``name``: the name a recipe or the command line uses (lower case, dashes allowed);
- ``description``: one line shown by ``tbpw plugins``;
- ``Options``: a pydantic model of the plugin's options, ``extra="forbid"`` so a typo fails loudly.

The core validates options with that model and builds the object as ``Class(options)``; the base
class's ``__init__`` keeps them as ``self.options``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import click
import pluggy

if TYPE_CHECKING:
    from tbpw.plugin.base import Allocator, Dataset, ErrorMetric, Evaluator, Executor

PROJECT = "tbpw"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def tbpw_register_allocators(register: Callable[[type[Allocator]], None]) -> None:
    """Register allocators: classes that turn an allocation problem into a type per tensor.

    Called once, when the plugin manager starts. An allocator is pure: it receives a
    ``tbpw.AllocationProblem`` (decidable tensors with candidate (type, bytes, error)
    lists, fixed bytes, a byte budget, constraints already applied to the candidate lists) and
    returns a ``dict`` of tensor name -> ggml type name whose total bytes fit the budget.

    Example::

        class Cheapest(Allocator):
            name = "cheapest"
            description = "the smallest candidate everywhere"

            def allocate(self, problem):
                return {t.name: min(t.candidates, key=lambda c: c.bytes).type for t in problem.tensors}

        @hookimpl
        def tbpw_register_allocators(register):
            register(Cheapest)
    """


@hookspec
def tbpw_register_metrics(register: Callable[[type[ErrorMetric]], None]) -> None:
    """Register error metrics: classes that score how much a quantized slice of rows differs from the original.

    Called once, when the plugin manager starts. A metric's ``slice_error(original, reconstructed,
    stats, context)`` receives two float32 arrays ``[n_rows, n_cols]`` (sampled rows of one tensor or
    one expert, and the same rows after quantize + dequantize), the column statistics of the importance
    matrix for those columns (``stats.sq`` = E[a^2] or None, ``stats.mean`` = E[a] or None) and a
    ``MetricContext`` (tensor name, role, candidate type, nominal bpw, rows in the slice). It returns one
    float: the error of the whole slice (tbpw sums slices of a 3-D tensor). Vectorised numpy, no I/O.
    ``prepare_rows(rows, context)`` returns the rows to quantize (usually ``rows``); optional
    ``setup(MeasureSetup)`` and ``tensor_factor(TensorSample, MetricContext) -> float`` are described in
    ``tbpw.ErrorMetric``, which has defaults for all three.

    Example::

        class Mse(ErrorMetric):
            name = "mse"; description = "relative squared error"
            def slice_error(self, original, reconstructed, stats, context):
                return float(((reconstructed - original) ** 2).sum() / (original ** 2).sum())

        @hookimpl
        def tbpw_register_metrics(register):
            register(Mse)
    """


@hookspec
def tbpw_register_datasets(register: Callable[[type[Dataset]], None]) -> None:
    """Register dataset sources: classes that produce calibration/evaluation text or a task file.

    Called once, when the plugin manager starts. A dataset's ``materialize(context)`` returns a
    ``tbpw.DatasetFile`` (a path to a file in the cache and its ``kind``: ``text``,
    ``hellaswag``, ``winogrande`` or ``multiple-choice``). It fetches what it needs into
    ``context.cache_dir`` and verifies it; missing network or a wrong hash raise ``TbpwError``.

    Example::

        class Inline(Dataset):
            name = "inline"; description = "text given in the recipe"
            class Options(PluginOptions):
                text: str
            def materialize(self, context):
                path = context.cache_dir / "inline.txt"; path.write_text(self.options.text)
                return DatasetFile(path, "text")

        @hookimpl
        def tbpw_register_datasets(register):
            register(Inline)
    """


@hookspec
def tbpw_register_evaluators(register: Callable[[type[Evaluator]], None]) -> None:
    """Register evaluators: classes that score a quantized model (perplexity, KLD, tasks, speed).

    Called once, when the plugin manager starts. An evaluator's ``evaluate(context)`` runs
    llama-perplexity on ``context.model`` through its ``tbpw.EvalContext`` (``context.kl_divergence()``,
    ``context.task(mode, role, tasks)``) and returns a flat ``dict`` of named numbers; its ``columns``
    (``tbpw.Column``) say what they are and which rank quants, and ``dataset_roles()`` which recipe
    datasets it reads.

    Example::

        @hookimpl
        def tbpw_register_evaluators(register):
            register(MyEvaluator)
    """


@hookspec
def tbpw_register_executors(register: Callable[[type[Executor]], None]) -> None:
    """Register executors: classes that run the tasks of a run's graph (in this process, a pool, a cluster).

    Called once, when the plugin manager starts. tbpw's scheduler gives an executor every job whose
    dependencies are done (``submit(job)``) and asks what happened (``poll(timeout)`` -> a list of
    ``tbpw.JobEvent``: started, done with the job's result, failed with its exception). Running a job is
    ``job.execute(log, slot)`` wherever the executor chooses; ``slot`` (``tbpw.ToolSlot``) gives the job's
    llama.cpp tools their thread count and GPUs. ``cancel()`` stops every job (Ctrl-C). A recipe picks one with
    ``executor: {name: ..., options: ...}``, the command line with ``tbpw run --executor NAME``.

    Example::

        class Inline(Executor):
            name = "inline"; description = "every job at once, in the calling thread"
            def submit(self, job):
                self.events = [*getattr(self, "events", []), JobEvent(job.name, "done", job.execute(print))]
            def poll(self, timeout):
                events, self.events = getattr(self, "events", []), []
                return events

        @hookimpl
        def tbpw_register_executors(register):
            register(Inline)
    """


@hookspec
def tbpw_register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``tbpw`` command line.

    Called once, when the command line starts, with the top-level ``click.Group``.

    Example::

        @hookimpl
        def tbpw_register_commands(cli):
            @cli.command()
            def hello():
                click.echo("hello from my plugin")
    """
