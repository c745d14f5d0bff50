"""Built-in datasets, registered through the `tbpw` entry-point group like any third-party plugin.

Sources:

- ``file``: a local text, JSONL or parquet file, or a task file (HellaSwag text, WinoGrande CSV,
  multiple-choice binary);
- ``url``: an HTTP(S) download verified by its required sha256;
- ``package``: a file inside a pinned registry package (name, version, sha256, path inside);
- ``hub``: a file of a Hugging Face dataset repository (or a config/split's parquet files), through
  huggingface_hub (the ``hub`` extra), kept in Hugging Face's own cache;
- ``mix``: several text datasets combined, each with a weight.

Presets: ``demo-wiki``, ``demo-mmlu`` and the offline ``substitute-*`` tasks (pinned registry data,
see ``tbpw.demo_assets``), and hub presets for the data real users use: ``wikitext-2``,
``imatrix-calibration``, ``arc-challenge``, ``arc-easy``, ``mmlu``, ``truthfulqa``, ``hellaswag``,
``winogrande``.

Text datasets take the same transforms: ``split`` (a disjoint calibration/evaluation split by
document, seeded), ``take_articles`` and ``take_tokens``. A document is a row of a JSONL/parquet
file, a blank-line separated block of a text file, or, with ``article_start``, everything from one
line matching that pattern to the next.
"""

from __future__ import annotations

from tbpw import hookimpl


@hookimpl
def tbpw_register_datasets(register) -> None:
    from .demo import SUBSTITUTE_PRESETS, DemoMmlu, DemoWiki
    from .sources import (
        HUB_PRESETS,
        FileDataset,
        HubDataset,
        ImatrixCalibration,
        Mix,
        PackageDataset,
        UrlDataset,
    )

    for cls in (FileDataset, UrlDataset, PackageDataset, HubDataset, *HUB_PRESETS, ImatrixCalibration,
                DemoWiki, DemoMmlu, *SUBSTITUTE_PRESETS, Mix):
        register(cls)
