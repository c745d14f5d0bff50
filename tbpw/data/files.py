"""What a dataset plugin gives back: a file and its kind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tbpw.errors import TbpwError

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
    offline: bool = False  # no network: a dataset that would download must say so instead
    extra: dict[str, Any] = field(default_factory=dict)
    # builds another dataset plugin by name and options (for datasets made of datasets, like `mix`)
    resolve: Callable[[str, dict[str, Any]], Any] | None = None

    def dataset(self, name: str, options: Mapping[str, Any] | None = None) -> Any:
        """Another dataset plugin, built from its name and options."""
        if self.resolve is None:
            raise TbpwError(f"dataset {name!r} was asked for, but this context cannot build datasets: "
                            "pass `resolve` (the plugin manager's datasets().create)")
        return self.resolve(name, dict(options or {}))

