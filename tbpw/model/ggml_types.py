"""The facts tbpw needs about ggml types, in one place.

Names, enum values and block sizes come from the gguf package, supplemented by MISSING_FROM_GGUF for
types the pinned build has and the released gguf (0.19.0) does not list yet. Fallbacks are stock
llama-quantize's (b11312, `tensor_type_fallback`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tbpw.errors import TbpwError

# Types of the pinned build (b11312) that gguf 0.19.0 does not know: name -> (enum value, block size,
# bytes per block), from ggml.h and ggml-common.h of that build.
MISSING_FROM_GGUF: dict[str, tuple[int, int, int]] = {"Q2_0": (42, 64, 18)}


@dataclass(frozen=True)
class ExtraType:
    """A ggml type gguf's GGMLQuantizationType lacks, with the same `name` and `value` attributes."""

    name: str
    value: int


# Stock llama-quantize's fallback when a type's block size does not divide the row length.
FALLBACK = {
    **{t: "IQ4_NL" for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")},
    **{t: "Q4_0" for t in ("Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0")},
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}
# A type with neither a fallback above nor a block of at most 32 (Q1_0: 128, NVFP4: 64) has none at all:
# stock llama-quantize stops with "no tensor type fallback is defined" on a row it does not fit.
SMALL_BLOCK = 32


def _known(name: str) -> bool:
    return name in GGMLQuantizationType.__members__ or name in MISSING_FROM_GGUF


@functools.lru_cache(maxsize=256)  # planning asks for the same few names tens of thousands of times
def _name_of(text: str) -> str:
    name = text.strip().upper()
    if not _known(name):
        raise KeyError(text)
    return name


def type_name(t: GGMLQuantizationType | ExtraType | int | str) -> str:
    """The canonical (upper-case) name of a ggml type given by name, enum member or enum value."""
    if isinstance(t, str):
        return _name_of(t)
    if isinstance(t, ExtraType):
        return t.name
    value = int(t)
    for name, (v, _, _) in MISSING_FROM_GGUF.items():
        if v == value:
            return name
    return GGMLQuantizationType(value).name


def ggml_type(value: int) -> GGMLQuantizationType | ExtraType:
    """The type with enum value `value` (ValueError when neither gguf nor MISSING_FROM_GGUF knows it)."""
    for name, (v, _, _) in MISSING_FROM_GGUF.items():
        if v == value:
            return ExtraType(name, v)
    return GGMLQuantizationType(value)


def type_id(t: str) -> int:
    """The ggml enum value of the type named `t`."""
    name = type_name(t)
    if name in MISSING_FROM_GGUF:
        return MISSING_FROM_GGUF[name][0]
    return GGMLQuantizationType[name].value


@functools.lru_cache(maxsize=256)
def block_and_size(t: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of the type named `t`."""
    name = type_name(t)
    if name in MISSING_FROM_GGUF:
        _, blck, size = MISSING_FROM_GGUF[name]
        return blck, size
    blck, size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    return blck, size


def block_size(t: str) -> int:
    return block_and_size(t)[0]


def row_bytes(t: str, row_length: int) -> int:
    blck, size = block_and_size(t)
    if row_length % blck:
        raise TbpwError(f"a row of {row_length} values does not fit {t} blocks of {blck}")
    return row_length // blck * size


def nominal_bpw(t: str) -> float:
    blck, size = block_and_size(t)
    return 8.0 * size / blck


def can_write(t: str, row_length: int) -> bool:
    """Whether stock llama-quantize writes a tensor with rows of `row_length` when asked for `t`
    (fallbacks allowed); False where it would stop for want of a fallback."""
    t = type_name(t)
    return row_length % block_size(t) == 0 or t in FALLBACK or block_size(t) <= SMALL_BLOCK


def effective_type(t: str, row_length: int) -> str:
    """The type stock llama-quantize really writes when asked for `t` on rows of `row_length`."""
    t = type_name(t)
    if row_length % block_size(t) == 0:
        return t
    if not can_write(t, row_length):
        raise TbpwError(f"{t} (blocks of {block_size(t)}) does not fit rows of {row_length} and stock llama-quantize "
                        f"has no fallback for it: leave {t} out for such tensors")
    fallback = FALLBACK.get(t, t)
    if row_length % block_size(fallback) != 0:
        return "F16"
    return fallback


# The fork's candidate list (EAddario/llama.cpp `quantize`, 2026-08), in its order.
FORK_TYPES: tuple[str, ...] = (
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL",
    "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "BF16",
)
# Types the pinned build quantizes (through libggml and llama-quantize) and runs in llama-perplexity on the
# CPU that the fork never tries: 1.125, 2.25, 4.25 and 4.5 bpw on blocks of 128, 64, 32 and 64.
STOCK_EXTRA_TYPES: tuple[str, ...] = ("Q1_0", "Q2_0", "MXFP4", "NVFP4")
IQ_TYPES = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL"})

FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})
