"""The options of the quality levers (a recipe's `calibrate:` and `choose:`, `tbpw calibrate` and `tbpw choose`).

Pure pydantic (no numpy), so the command line shows these defaults in `--help` without loading the tools:
one set of defaults, used by the recipe, the command line and the functions of tbpw.select alike.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tbpw.errors import TbpwError
from tbpw.options import TOOL_INT, Strict


class CalibrateOptions(Strict):
    """Scale the error table to measured KL divergence (tbpw.select.calibrate): each group of tensors is quantized
    alone to each probe type and its KLD increase on calibration text is measured."""

    probes: list[str] = Field(default_factory=lambda: ["Q3_K"], min_length=1)
    grouping: Literal["tensor", "role"] = "role"  # role: one measurement per role (cheap); tensor: one per tensor
    strengths: list[float] = Field(default_factory=lambda: [1.0, 0.5], min_length=1)  # one calibrated table each
    ctx: int = Field(512, ge=32, le=TOOL_INT)
    chunks: int = Field(8, ge=1, le=TOOL_INT)
    # the type every tensor outside the probed group keeps: float (its stored type) or a near-lossless type
    background: str = "float"

    @field_validator("background")
    @classmethod
    def _background(cls, value: str) -> str:
        if value.lower() == "float":
            return "float"
        from tbpw.model.ggml_types import type_name

        try:
            return type_name(value)
        except (KeyError, ValueError, TbpwError) as exc:
            raise ValueError(f"unknown background type ({exc}): use float or a type such as Q8_0") from None

    @field_validator("strengths")
    @classmethod
    def _strengths(cls, value: list[float]) -> list[float]:
        if any(not 0 < s <= 1 for s in value):
            raise ValueError("each strength is in (0, 1]: 1 trusts the measured scales fully, 0.5 hedges")
        return value

    @field_validator("probes")
    @classmethod
    def _probes(cls, value: list[str]) -> list[str]:
        from tbpw.model.ggml_types import FLOAT_TYPES, type_name

        names = []
        for i, v in enumerate(value):
            try:
                names.append(type_name(v))
            except (KeyError, ValueError, TbpwError):
                raise ValueError(f"{v!r} (probe {i}) is not a ggml type: use type names such as Q3_K or IQ4_XS") from None
            if names[-1] in FLOAT_TYPES:
                raise ValueError(f"{names[-1]} (probe {i}) is a float type, which costs no measurable KL divergence: "
                                 "probe with a quantized type such as Q3_K")
        return names


class ChooseOptions(Strict):
    """Per target, write every plan (each allocator on each error table: measured, and calibrated when
    `calibrate` is set) and keep the one closest to the float model on CALIBRATION text."""

    ctx: int = Field(512, ge=32, le=TOOL_INT)
    chunks: int = Field(16, ge=1, le=TOOL_INT)
    # the error tables whose plans are candidates: all (the measured one and the calibrated ones), or only the
    # calibrated ones
    tables: Literal["all", "calibrated"] = "calibrated"
    # also write and evaluate each allocator's plan on the measured table as a quant of its own (quant-<target>-
    # <allocator>), beside the choice: what calibrating and choosing buy, at a full quantization and an evaluation
    # per allocator and target; the choice's quant was better at all 37 levels of docs/results/quality.md
    measured_quants: bool = False
    # score in rounds of this many chunks, each chunk once per plan: every distinct plan on the first round, then
    # only the leader and the plans tied with it so far (tbpw.select.scoring.tied_with_leader), until one is left
    # or they have all `chunks`; 0: every plan on all of them at once
    screen_chunks: int = Field(2, ge=0)
    finalists: int = Field(3, ge=1)  # at most this many plans go on from a round
    # and only those that may beat the leader by more than this part of its KLD: closer plans are not worth the
    # chunks (docs/results/quality.md: the replay of 18 choices picks the same plans as scoring every plan on every chunk,
    # with a quarter fewer chunks than rounds of 4 without a margin)
    margin: float = Field(0.02, ge=0.0, lt=1.0)
    refine_rounds: int = Field(0, ge=0)  # then improve the winner by type swaps that calibration KLD confirms
    refine_tries: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _screening(self) -> ChooseOptions:
        if self.screen_chunks == 1:
            raise ValueError("screen_chunks is 0 (no screening) or at least 2: the tie rule needs two chunks")
        return self
