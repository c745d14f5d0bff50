"""Stage `data-<role>`: one of the recipe's datasets, materialized by its plugin and kept in the run directory.

The dataset plugin makes (or fetches, verified) the file every time, which is cheap once cached: the stage is
keyed by the content the dataset gives now, so a source file edited in place is noticed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tbpw.data.files import DatasetContext, DatasetFile
from tbpw.files import paths
from tbpw.options import PluginRef
from tbpw.stages.context import StageContext
from tbpw.stages.cost import Cost, ModelSize


def name(role: str) -> str:
    return f"data-{role}"


def run(ctx: StageContext, role: str, ref: PluginRef) -> DatasetFile:
    registry = ctx.plugins.datasets()
    context = DatasetContext(cache_dir=paths.assets(), resolve=registry.create)
    made = registry.create(ref.name, ref.options).materialize(context)

    def keep(folder: Path) -> dict:
        target = folder / Path(made.path).name
        shutil.copyfile(made.path, target)
        return {"file": target.name, "kind": made.kind, "description": made.description,
                "attribution": made.attribution}

    out = ctx.stage(name(role), {"source": Path(made.path)}, ref, keep)
    return DatasetFile(out.path(out.result["file"]), out.result["kind"], out.result["description"],
                       out.result["attribution"])


def cost(size: ModelSize | None) -> Cost:
    """A copy of a text or task file: nothing worth counting."""
    return Cost()
