"""A recipe's targets: how a user names one (bits per weight, a file size, or the size of a stock type) and the
byte budget it becomes once the stock file it may refer to is made."""

from __future__ import annotations

from pydantic import Field, model_validator

from tbpw.errors import TbpwError
from tbpw.model.budget import Target, parse_size
from tbpw.options import Strict
from tbpw.stages.cost import ModelSize, stock_bytes
from tbpw.stages.quant import Quant


class RecipeTarget(Strict):
    """One of: bpw (all tensor bytes / all elements, no metadata), size (file size with metadata), or
    stock (the bpw of the stock llama-quantize file of that type, for comparisons at equal size)."""

    bpw: float | None = Field(None, gt=0, le=32, allow_inf_nan=False)
    size: str | None = None
    stock: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> RecipeTarget:
        given = [k for k in ("bpw", "size", "stock") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of bpw, size, stock (got {', '.join(given) or 'none'})")
        if self.size is not None:
            try:
                parse_size(self.size)
            except TbpwError as exc:
                raise ValueError(str(exc)) from None
        return self

    @property
    def label(self) -> str:
        if self.bpw is not None:
            return f"{self.bpw:g}bpw"
        if self.size is not None:
            return self.size.replace(" ", "")
        return f"like-{self.stock}"


def budget(target: RecipeTarget, stock: Quant | None) -> Target:
    """The target's budget; a `stock:` target's is the bpw of `stock`, the stock file the run made of that type."""
    if target.stock:
        assert stock is not None  # the graph passes the stock quant of a `stock:` target
        return Target.parse(bpw=stock.bpw)
    return Target.parse(bpw=target.bpw, size=target.size)


def estimated_bytes(target: RecipeTarget, size: ModelSize | None) -> int:
    """A quant's bytes for `target`, before any file is made: its tensor bytes and the model's metadata (a `stock:`
    target: the stock file's bound, `stock_bytes`)."""
    if size is None:
        return 0
    if target.size is not None:
        return parse_size(target.size)
    if target.stock is not None:
        return stock_bytes(target.stock, size)
    assert target.bpw is not None  # a target is one of bpw, size, stock
    return int(target.bpw * size.n_elements / 8) + size.metadata_bytes
