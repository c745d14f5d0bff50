"""Plugin instances for tests: the floors below the stages take instances, not names (tbpw's registry makes them)."""

from __future__ import annotations

from typing import Any


def allocator(name: str, **options: Any) -> Any:
    from tbpw.plugin.manager import get_manager

    return get_manager().allocators().create(name, options)


def measure(model, imatrix=None, metric: str | None = None, metric_options: dict | None = None, *, candidates=None,
            sampling=None, threads=None, **kwargs: Any):
    """`tbpw.measure.engine.measure` with the metric named (default: the registry's) and its options spelled out, as
    `tbpw run`'s measure stage calls it from a recipe's `measure:`."""
    from tbpw.measure.engine import measure as run
    from tbpw.measure.options import MeasureOptions
    from tbpw.plugin.manager import get_manager

    name = metric or get_manager().metrics().default_name()
    options = MeasureOptions.model_validate({"metric": {"name": name, "options": metric_options or {}},
                                             "candidates": candidates, "sampling": sampling or {}, "threads": threads})
    return run(model, imatrix, get_manager().metrics().create(name, metric_options or {}), options, **kwargs)


def allocate(inventory, problem, name: str, options: dict | None = None, *, metadata_bytes: int | None = None):
    """`tbpw.allocate.service.allocate` with the allocator named and its options given, made by the registry."""
    from tbpw.allocate.service import allocate as run

    return run(inventory, problem, allocator(name, **(options or {})), metadata_bytes=metadata_bytes)
