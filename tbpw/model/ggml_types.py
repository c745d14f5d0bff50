"""The facts tbpw needs about ggml types, in one place.
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tbpw.errors import TbpwError

# Stock llama-quantize's fallback when a type's block size does not divide the row length.
FALLBACK = {
    **{t: "IQ4_NL" for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")},
    **{t: "Q4_0" for t in ("Q2_K", "Q3_K", "TQ1_0", "TQ2_0")},
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}


def type_name(t: GGMLQuantizationType | int | str) -> str:
    if isinstance(t, str):
        return GGMLQuantizationType[t.upper()].name
    return GGMLQuantizationType(int(t)).name


def block_size(t: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[t]][0]


def row_bytes(t: str, row_length: int) -> int:
    blck, size = GGML_QUANT_SIZES[GGMLQuantizationType[t]]
    if row_length % blck:
        raise TbpwError(f"a row of {row_length} values does not fit {t} blocks of {blck}")
    return row_length // blck * size


def nominal_bpw(t: str) -> float:
    blck, size = GGML_QUANT_SIZES[GGMLQuantizationType[t]]
    return 8.0 * size / blck


def effective_type(t: str, row_length: int) -> str:
    """The type stock llama-quantize really writes when asked for `t` on rows of `row_length`."""
    t = type_name(t)
    if row_length % block_size(t) == 0:
        return t
    fallback = FALLBACK.get(t, t)
    if row_length % block_size(fallback) != 0:
        return "F16"
    return fallback


# The fork's candidate list (EAddario/llama.cpp `quantize`, 2026-08), in its order.
FORK_TYPES: tuple[str, ...] = (
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL",
    "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "BF16",
)
IQ_TYPES = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL"})

FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})
