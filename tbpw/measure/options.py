"""The measurement's options: which metric, which candidate types, how many rows (the recipe's `measure:`).

Pure pydantic (no numpy), so that the command line can show these defaults in `--help` without loading the
engine; `tbpw.measure.engine.measure` takes a `MeasureOptions`, the recipe composes it, `tbpw measure` and
`tbpw quantize` build it from their flags.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tbpw.errors import TbpwError
from tbpw.options import PluginRef, Strict


class SamplingOptions(BaseModel):
    """How many rows to measure. The defaults are the fork's; `scale` < 1 measures fewer, > 1 more."""

    model_config = ConfigDict(extra="forbid")

    budget_elements: int = Field(1 << 20, gt=0, description="elements per tensor when the imatrix has E[a]")
    budget_elements_no_mean: int = Field(1 << 19, gt=0, description="elements per tensor without E[a]")
    min_rows: int = Field(512, ge=1, description="rows per slice at least (with E[a])")
    min_rows_no_mean: int = Field(256, ge=1, description="rows per slice at least (without E[a])")
    max_rows: int = Field(4096, ge=1, description="rows per slice at most")
    scale: float = Field(1.0, gt=0, description="multiplies the budget and both row limits")
    sampled_share: float = Field(0.2, gt=0, le=1, description="where the fork samples a slice (does not measure "
                                 "every row), measure this share of its row count; 1: the fork's rows exactly")
    all_rows: bool = Field(False, description="measure every row (exact, slow)")



class MeasureOptions(Strict):
    metric: PluginRef | None = None  # None: the registry's default metric
    candidates: list[str] | None = None  # ggml type names and the sets `fork`, `extra`; None = the default 20
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)
    threads: int | None = Field(None, ge=1)

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, value: list[str] | None) -> list[str] | None:
        from tbpw.measure.candidates import normalize_types

        if value is not None:
            try:
                normalize_types(value)
            except TbpwError as exc:
                raise ValueError(str(exc)) from None
        return value
