"""Offline presets from the assets tbpw pins: Wikipedia text split by article, MMLU dev questions, and clearly
labelled substitutes for the task benchmarks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tbpw import Dataset, DatasetContext, DatasetFile, DatasetKind, NoOptions, PluginOptions, demo_assets

from .sources import TOKEN_BYTES, Source, output_path, take, write_documents


class DemoWiki(Source):
    name = "demo-wiki"
    description = "English Wikipedia articles from the pinned exllamav2 wheel, split by article into calibration and evaluation"

    class Options(PluginOptions):
        split: Literal["calibration", "evaluation"] = Field(description="calibration (for imatrix) or evaluation (held out, for perplexity)")
        take_articles: int | None = Field(None, ge=1, description="keep the first N articles")
        take_tokens: int | None = Field(None, ge=1, description=f"keep about N tokens ({TOKEN_BYTES} UTF-8 bytes per token)")

    def kind(self) -> DatasetKind:
        return "text"

    def documents(self, context: DatasetContext) -> list[str]:
        wiki = demo_assets.wiki_split(offline=context.offline)
        docs = [a.text + "\n\n" for a in wiki.articles(self.options.split)]
        return take(docs, self.options.take_articles, self.options.take_tokens)

    def materialize(self, context: DatasetContext) -> DatasetFile:
        wiki = demo_assets.wiki_split(offline=context.offline)
        side = self.options.split
        description = f"English Wikipedia, {side} side of tbpw's split by article (disjoint from the {'evaluation' if side == 'calibration' else 'calibration'} side)"
        if self.options.take_articles is None and self.options.take_tokens is None:
            return DatasetFile(wiki.calibration if side == "calibration" else wiki.evaluation, "text", description, wiki.attribution)
        # keyed by the split's manifest: a rebuilt split makes new derived files
        target = output_path(context, self.name, self.options, (wiki.folder / "manifest.json").read_text())
        return DatasetFile(write_documents(self.documents(context), target), "text", description, wiki.attribution)


class DemoMmlu(Dataset):
    name = "demo-mmlu"
    description = "MMLU dev questions (from the pinned lm-eval wheel) in llama-perplexity's multiple-choice format"
    Options = NoOptions


    def kind(self) -> DatasetKind:
        return "multiple-choice"

    def materialize(self, context: DatasetContext) -> DatasetFile:
        return demo_assets.mmlu_dev(offline=context.offline)


def _substitute(preset: str) -> type:
    label = demo_assets.SUBSTITUTES[preset][3]

    class Substitute(Dataset):
        name = preset
        description = f"offline {label}"
        Options = NoOptions

        def kind(self) -> DatasetKind:
            return demo_assets.SUBSTITUTES[preset][1]

        def materialize(self, context: DatasetContext) -> DatasetFile:
            return demo_assets.substitutes(offline=context.offline)[preset]

    Substitute.__name__ = Substitute.__qualname__ = "Substitute_" + preset.split("-", 1)[1]
    return Substitute


SUBSTITUTE_PRESETS = [_substitute(name) for name in demo_assets.SUBSTITUTES]

