"""tbpw: quantize GGUF models to an exact bits-per-weight target with the least error, on stock llama.cpp.

This module is the public API for plugin authors: a plugin imports what it needs from ``tbpw`` and
nothing deeper. Names are loaded on first use, so ``import tbpw`` (and the command line's start) stays
cheap; ``tbpw.plugin.hookspecs`` documents every hook.

    from tbpw import Allocator, hookimpl

    class Cheapest(Allocator):
        name = "cheapest"
        description = "the smallest candidate for every tensor"

        def allocate(self, problem):
            return {t.name: t.candidates[0].type for t in problem.tensors}

    @hookimpl
    def tbpw_register_allocators(register):
        register(Cheapest)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tbpw.version import __version__

# name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # hooks and errors
    "hookimpl": "tbpw.plugin.hookspecs",
    "TbpwError": "tbpw.errors",
    # base classes and their options
    "Plugin": "tbpw.plugin.base",
    "Allocator": "tbpw.plugin.base",
    "ErrorMetric": "tbpw.plugin.base",
    "Dataset": "tbpw.plugin.base",
    "Evaluator": "tbpw.plugin.base",
    "Executor": "tbpw.plugin.base",
    "Column": "tbpw.plugin.base",
    "NoOptions": "tbpw.plugin.base",
    "PluginOptions": "tbpw.plugin.base",
    # what an allocator receives
    "AllocationProblem": "tbpw.allocate.problem",
    "AllocationContext": "tbpw.allocate.problem",
    "DecidableTensor": "tbpw.allocate.problem",
    "Candidate": "tbpw.allocate.problem",
    "Member": "tbpw.allocate.problem",
    "Target": "tbpw.model.budget",
    # what an error metric receives
    "ColumnStats": "tbpw.measure.slices",
    "MetricContext": "tbpw.measure.slices",
    "MeasureSetup": "tbpw.measure.slices",
    "TensorSample": "tbpw.measure.slices",
    # what a dataset receives and returns
    "DatasetContext": "tbpw.data.files",
    "DatasetFile": "tbpw.data.files",
    "DatasetKind": "tbpw.data.files",
    # what an evaluator receives
    "EvalContext": "tbpw.evaluate.context",
    # what an executor receives and reports, and what it gives a job's tools
    "Job": "tbpw.jobs",
    "JobEvent": "tbpw.jobs",
    "Resources": "tbpw.jobs",
    "ToolSlot": "tbpw.llamacpp.resources",
    "cpu_count": "tbpw.llamacpp.resources",
    "visible_gpus": "tbpw.llamacpp.resources",
    "split_threads": "tbpw.llamacpp.resources",
    "stop_tool_processes": "tbpw.llamacpp.resources",
    # ggml type facts
    "FORK_TYPES": "tbpw.model.ggml_types",
    "IQ_TYPES": "tbpw.model.ggml_types",
    "nominal_bpw": "tbpw.model.ggml_types",
    "effective_type": "tbpw.model.ggml_types",
    "type_name": "tbpw.model.ggml_types",
    "fork_pareto": "tbpw.measure.candidates",
    # the fork's random streams, for metrics that reproduce it
    "MT19937": "tbpw.measure.sampling",
    "normal_float32": "tbpw.measure.sampling",
    # files: written atomically, pinned registry archives, task formats
    "atomic_path": "tbpw.files.atomic",
    "write_text": "tbpw.files.atomic",
    "write_json": "tbpw.files.atomic",
    "sha256_file": "tbpw.files.digest",
    "content_sha256": "tbpw.files.digest",
    "PinnedArchive": "tbpw.files.pinned",
    "fetch_pinned": "tbpw.files.pinned",
    "extract_member": "tbpw.files.pinned",
    "check_task_file": "tbpw.data.taskformats",
    # the demo assets tbpw pins (offline text, MMLU dev questions, labelled substitutes)
    # llama.cpp, for plugins that run its tools
    "ensure_tool_features": "tbpw.llamacpp.features",
    "fork_target_types": "tbpw.llamacpp.quantize",
}

# whole modules offered as a namespace
_MODULES: dict[str, str] = {"demo_assets": "tbpw.data.assets"}

__all__ = ["__version__", *_EXPORTS, *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value: Any = importlib.import_module(_MODULES[name])
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'tbpw' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from tbpw.allocate.problem import AllocationContext, AllocationProblem, Candidate, DecidableTensor, Member
    from tbpw.data import assets as demo_assets
    from tbpw.data.files import DatasetContext, DatasetFile, DatasetKind
    from tbpw.data.taskformats import check_task_file
    from tbpw.errors import TbpwError
    from tbpw.evaluate.context import EvalContext
    from tbpw.files.atomic import atomic_path, write_json, write_text
    from tbpw.files.digest import content_sha256, sha256_file
    from tbpw.files.pinned import PinnedArchive, extract_member, fetch_pinned
    from tbpw.jobs import Job, JobEvent, Resources
    from tbpw.llamacpp.features import ensure_tool_features
    from tbpw.llamacpp.quantize import fork_target_types
    from tbpw.llamacpp.resources import ToolSlot, cpu_count, split_threads, stop_tool_processes, visible_gpus
    from tbpw.measure.candidates import fork_pareto
    from tbpw.measure.sampling import MT19937, normal_float32
    from tbpw.measure.slices import ColumnStats, MeasureSetup, MetricContext, TensorSample
    from tbpw.model.budget import Target
    from tbpw.model.ggml_types import FORK_TYPES, IQ_TYPES, effective_type, nominal_bpw, type_name
    from tbpw.plugin.base import (
        Allocator,
        Column,
        Dataset,
        ErrorMetric,
        Evaluator,
        Executor,
        NoOptions,
        Plugin,
        PluginOptions,
    )
    from tbpw.plugin.hookspecs import hookimpl
