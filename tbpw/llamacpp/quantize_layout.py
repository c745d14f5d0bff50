"""The file stock llama-quantize writes, byte for byte, before any tensor data is known.

llama-quantize (b11312, src/llama-quant.cpp and tools/quantize/quantize.cpp) lays out its output as:

- the GGUF header (version 3, tensor count, key/value count);
- the input's key/values in the input's order, then `general.quantization_version` (u32 2) and
  `general.file_type` (u32, the base type's llama_ftype) moved to the end, the `split.*` keys removed, then
  the key/value overrides in command-line order (every `--override-kv`, then the imatrix keys
  `quantize.imatrix.file`, `.dataset`, `.entries_count`, `.chunks_count`): setting a key removes it and appends
  it, an int override is written as u32 of its absolute value, a float as f32, strings are cut to 127 bytes;
- one tensor info per tensor (name, dimensions with trailing 1s dropped, type, offset), tensors sorted by
  layer (`blk.N.`; others first) and then by name;
- zeros up to the 32-byte alignment, then each tensor's data followed by zeros up to the next multiple of 32.

`output_layout` computes all of that from the input's layout and the planned types, so a plan's file can be
assembled from already-quantized tensor data (tbpw.allocate.store) and equal what llama-quantize writes.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType

from tbpw.errors import TbpwError
from tbpw.model.ggml_types import row_bytes
from tbpw.model.gguf_layout import GgufLayout

GGUF_VERSION = 3
ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT: llama-quantize pads with it
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
# llama_ftype of the base types tbpw hands to llama-quantize (include/llama.h)
FILE_TYPES = {"Q8_0": 7}
# The stock types a mixed plan's file is labelled by (`general.file_type`, what llama-bench and other tools show as
# its type): the llama_ftype (include/llama.h) and the size llama-quantize's own help gives for it on Llama-3-8B
# (GB of its 8.03 B weights, about bpw), smallest first. K-quant names where they exist, IQ below Q2_K.
FILE_TYPE_LABELS = (("IQ1_S", 24, 1.56), ("IQ1_M", 31, 1.75), ("IQ2_XXS", 19, 2.06), ("IQ2_XS", 20, 2.31),
                    ("IQ2_S", 28, 2.5), ("IQ2_M", 29, 2.7), ("Q2_K", 10, 2.95), ("Q3_K_S", 11, 3.40),
                    ("Q3_K_M", 12, 3.73), ("Q3_K_L", 13, 4.01), ("Q4_K_S", 14, 4.35), ("Q4_K_M", 15, 4.56),
                    ("Q5_K_S", 16, 5.19), ("Q5_K_M", 17, 5.31), ("Q6_K", 18, 6.12), ("Q8_0", 7, 7.93))


def file_type_label(bpw: float) -> tuple[str, int]:
    """The stock type a mixed file of `bpw` is labelled as: the largest one whose usual size is at most `bpw`
    (as mixed-quant publishers name theirs), with its llama_ftype; the smallest below all of them."""
    below = [label for label in FILE_TYPE_LABELS if label[2] <= bpw + 1e-9]
    name, ftype, _ = below[-1] if below else FILE_TYPE_LABELS[0]
    return name, ftype


def file_type_override(bpw: float) -> str:
    """The `--override-kv` that labels a mixed file of `bpw` honestly (llama-quantize sets `general.file_type` to
    its base type's, Q8_0, and applies overrides after it)."""
    return f"general.file_type=int:{file_type_label(bpw)[1]}"
_KV_MAX_STR = 127
_U32, _I32, _F32, _BOOL, _STRING = 4, 5, 6, 7, 8
_LAYER = re.compile(rb"^blk\.\s*([+-]?\d+)")


@dataclass(frozen=True)
class KvOverride:
    """One `--override-kv KEY=TYPE:VALUE` of llama-quantize (TYPE: int, float, bool, str)."""

    key: str
    kind: str
    value: int | float | bool | str

    @classmethod
    def parse(cls, text: str) -> KvOverride:
        """`KEY=int:5`, `KEY=float:0.5`, `KEY=bool:true`, `KEY=str:text`, as llama.cpp parses them."""
        key, sep, rest = text.partition("=")
        kind, colon, raw = rest.partition(":")
        if not sep or not colon or len(key.encode()) >= 128 or kind not in ("int", "float", "bool", "str"):
            raise TbpwError(f"malformed KV override {text!r}: write KEY=int:N, KEY=float:X, KEY=bool:true|false or KEY=str:TEXT")
        if kind == "bool" and raw not in ("true", "false"):
            raise TbpwError(f"KV override {text!r}: a bool is true or false")
        if kind == "str" and len(raw.encode()) > _KV_MAX_STR:
            raise TbpwError(f"KV override {text!r}: a string value may have at most {_KV_MAX_STR} bytes")
        value: int | float | bool | str
        try:
            if kind == "int":
                value = int(raw)
            elif kind == "float":
                value = float(raw)
            else:
                value = raw == "true" if kind == "bool" else raw
        except ValueError:
            raise TbpwError(f"KV override {text!r}: {raw!r} is not a valid {kind}") from None
        return cls(key, kind, value)

    def entry(self) -> bytes:
        if self.kind == "int":
            return _kv_u32(self.key, abs(int(self.value)) & 0xFFFFFFFF)
        if self.kind == "float":
            return _key(self.key) + struct.pack("<If", _F32, float(self.value))
        if self.kind == "bool":
            return _key(self.key) + struct.pack("<IB", _BOOL, 1 if self.value else 0)
        return _kv_str(self.key, str(self.value).encode("utf-8"))


def _key(key: str) -> bytes:
    raw = key.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _kv_u32(key: str, value: int) -> bytes:
    return _key(key) + struct.pack("<II", _U32, value)


def _kv_str(key: str, value: bytes) -> bytes:
    value = value[:_KV_MAX_STR]
    return _key(key) + struct.pack("<IQ", _STRING, len(value)) + value


def imatrix_name(imatrix: Path | str) -> str:
    """What a quant made with `imatrix` records as `quantize.imatrix.file`: the file's name alone (tbpw runs
    llama-quantize in the imatrix's folder), so that no published file names a local folder."""
    return Path(imatrix).name


def imatrix_entries(imatrix: Path | str) -> list[bytes]:
    """The `quantize.imatrix.*` key/values llama-quantize adds for `imatrix` (given by its name, `imatrix_name`)."""
    from tbpw.imatrix.reader import Imatrix

    imx = Imatrix.load(imatrix)
    out = [_kv_str("quantize.imatrix.file", imatrix_name(imatrix).encode("utf-8"))]
    if imx.datasets:
        out.append(_kv_str("quantize.imatrix.dataset", imx.datasets[0].encode("utf-8")))
    out.append(_kv_u32("quantize.imatrix.entries_count", len(imx.entries)))
    if imx.chunk_count > 0:
        out.append(_kv_u32("quantize.imatrix.chunks_count", imx.chunk_count))
    return out


def tensor_order(names: Sequence[str]) -> list[str]:
    """The order llama-quantize writes tensors in: by `blk.N.` layer (tensors outside blocks first), then name."""
    def key(name: str) -> tuple[int, bytes]:
        raw = name.encode("utf-8")
        m = _LAYER.match(raw)
        return (int(m.group(1)) if m else -1, raw)

    return sorted(names, key=key)


@dataclass(frozen=True)
class PlacedTensor:
    name: str
    type: str  # ggml type written
    offset: int  # absolute offset of its data in the output file
    n_bytes: int  # its data, without the padding


@dataclass(frozen=True)
class OutputLayout:
    header: bytes  # everything before the first tensor's data, padding included
    tensors: list[PlacedTensor]  # in file order
    file_bytes: int


def _pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def output_layout(layout: GgufLayout, types: Mapping[str, str], *, imatrix: Path | str | None,
                  base_type: str = "Q8_0", overrides: Sequence[str | KvOverride] = ()) -> OutputLayout:
    """The exact layout of `llama-quantize [--override-kv O]... [--imatrix I] --tensor-type-file ... MODEL OUT
    BASE_TYPE` when it writes every tensor as `types` says (tensors not named keep their stored type)."""
    if base_type not in FILE_TYPES:
        raise TbpwError(f"the file layout of base type {base_type} is not known to tbpw: use {', '.join(FILE_TYPES)}")
    if "general.alignment" in layout.fields:
        raise TbpwError(f"{layout.path.name} sets general.alignment, which llama-quantize does not carry over "
                        "consistently: quantize it with llama-quantize")
    removed = {"general.quantization_version", "general.file_type", "split.no", "split.count", "split.tensors.count"}
    parsed = [o if isinstance(o, KvOverride) else KvOverride.parse(o) for o in overrides]
    tail: list[tuple[str, bytes]] = [
        ("general.quantization_version", _kv_u32("general.quantization_version", QUANTIZATION_VERSION)),
        ("general.file_type", _kv_u32("general.file_type", FILE_TYPES[base_type])),
        *((o.key, o.entry()) for o in parsed)]
    if imatrix is not None:
        tail += [(_entry_key(e), e) for e in imatrix_entries(imatrix)]
    kvs: dict[str, bytes] = {}
    for key in layout.kv_spans:
        if key not in removed:
            kvs[key] = layout.kv_bytes(key)
    for key, entry in tail:
        kvs.pop(key, None)  # setting a key removes it and appends it
        kvs[key] = entry
    by_name = {t.name: t for t in layout.tensors}
    unknown = sorted(set(types) - set(by_name))
    if unknown:
        raise TbpwError(f"{unknown[0]} is not a tensor of {layout.path.name}")
    infos, placed, offset = [], [], 0
    for name in tensor_order(list(by_name)):
        t = by_name[name]
        written = types.get(name, t.tensor_type.name)
        ne = list(t.shape) + [1] * (4 - len(t.shape))
        n_rows = 1
        for d in ne[1:]:
            n_rows *= d
        n_bytes = n_rows * row_bytes(written, ne[0])
        n_dims = max([i + 1 for i in range(1, 4) if ne[i] > 1], default=1)
        infos.append(_key(name) + struct.pack("<I", n_dims) + struct.pack(f"<{n_dims}q", *ne[:n_dims])
                     + struct.pack("<iQ", GGMLQuantizationType[written].value, offset))
        placed.append((name, written, offset, n_bytes))
        offset += _pad(n_bytes)
    head = b"GGUF" + struct.pack("<Iqq", GGUF_VERSION, len(placed), len(kvs)) + b"".join(kvs.values()) + b"".join(infos)
    header = head + b"\0" * (_pad(len(head)) - len(head))
    tensors = [PlacedTensor(name, written, len(header) + off, n) for name, written, off, n in placed]
    return OutputLayout(header, tensors, len(header) + offset)


def _entry_key(entry: bytes) -> str:
    (n,) = struct.unpack_from("<Q", entry, 0)
    return entry[8:8 + n].decode("utf-8")
