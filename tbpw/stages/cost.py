"""What a stage will cost, as the stage itself estimates it before any work; and the model size it starts from.

A `Cost` counts what a run prints in its plan (llama-quantize runs, KLD runs on calibration text, evaluation
runs, llama-bench runs), what prices its time (whole-model quantizations of work, tokens through the model) and
the disk it leaves or needs on the way. `tbpw.run.costplan` adds the costs of a graph's stages; nothing there
knows a stage by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from tbpw.model.ggml_types import nominal_bpw, type_name

MIN_STOCK_BPW = 1.5  # a lower bound of any stock type's size
ASSUMED_ROLES = 10  # calibration groups when grouping by role and the model's roles are not known yet


@dataclass(frozen=True)
class ModelSize:
    """The float model as far as it is known before the run: weights, weights a token uses, vocabulary."""

    n_elements: int
    n_active: int  # weights one token multiplies (mixture of experts: the routed experts only)
    vocab: int
    stored_bytes: int  # the source's tensor bytes
    needs_copy: bool  # the run writes a float GGUF of it (converted or requantized)
    source: str  # where the numbers come from
    roles: int = ASSUMED_ROLES
    tensors: int = 0  # quantizable tensors (0: unknown)
    metadata_bytes: int = 0  # what a GGUF of it holds besides tensor data (key/values, the tokenizer)
    imatrix_values: int = 0  # the numbers an imatrix of it holds per statistic (input columns x experts)
    # a GGUF's bytes with every quantizable tensor as a type (its fallbacks on rows that do not fit applied), when
    # the tensor table is known
    bytes_at: Callable[[str], int] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Cost:
    """One stage's estimate. Bytes are 0 when the model's size is not known yet."""

    quantizations: int = 0  # llama-quantize runs (or store assemblies) of the whole model
    klds: int = 0  # KLD runs on calibration text
    klds_at_most: bool = False  # `klds` is an upper bound (screening in rounds may stop early)
    evaluations: int = 0  # evaluator runs on a quant
    benches: int = 0  # llama-bench runs
    quantize_work: float | None = None  # whole-model quantizations of work for the time (None: `quantizations`)
    tokens: int = 0  # tokens through the model (baseline, imatrix, KLD and evaluation passes, llama-bench)
    disk: int = 0  # bytes the stage leaves in the run directory (negative: what it deletes)
    held: int = 0  # bytes that exist until this stage deletes them (a target's plans `keep: chosen` drops)
    in_flight: int = 0  # the largest file it makes and removes on the way (a choice candidate)
    as_is: bool = False  # it makes nothing: its input is used as it is (a float GGUF model)
    # stages with the same key are alternatives, only one of which runs (the task evaluation and llama-bench of
    # a target's quants: only its selected quant's run)
    alternatives: str | None = None
    uncounted: tuple[str, ...] = ()  # what this estimate leaves out

    @property
    def work(self) -> float:
        return float(self.quantizations) if self.quantize_work is None else self.quantize_work


def main_type(name: str) -> str | None:
    """A stock type's main ggml type (Q4_K_M -> Q4_K), or None when it names none."""
    for base in (name.upper(), re.sub(r"_(?:XXS|XS|S|M|L|XL)$", "", name.upper())):
        try:
            return type_name(base)
        except (KeyError, ValueError):
            continue
    return None


def stock_bpw(name: str) -> float:
    """The nominal bpw of a stock type's main ggml type (Q4_K_M -> Q4_K: 4.5), a lower bound of its size."""
    main = main_type(name)
    return nominal_bpw(main) if main is not None else MIN_STOCK_BPW


# A stock mixture raises some tensors above its main type (attn_v, ffn_down, the output); every tensor one type up
# bounds it from above (the tiny llama's Q4_K_M is 1.16x its main type's size, a type up 1.21x).
_LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


def stock_bytes(name: str, size: ModelSize) -> int:
    """An upper bound of a stock file's bytes: every quantizable tensor a type above the stock type's main one
    (with the model's fallbacks, and its metadata) when the tensor table is known; else the main type's nominal
    size."""
    main = main_type(name)
    if size.bytes_at is None or main is None:
        return int(stock_bpw(name) * size.n_elements / 8)
    above = next((t for t in _LADDER if nominal_bpw(t) > nominal_bpw(main)), _LADDER[-1])
    return size.bytes_at(above)
