"""The layout of a GGUF file (key/values, tensor infos, data offsets), read without parsing big arrays.

gguf's GGUFReader turns every element of every metadata array into its own numpy view; a 262k-token
vocabulary takes it tens of seconds, on every run. This reader steps over arrays and keeps only scalar
and string values, then memory-maps the tensor data: opening any model takes milliseconds. Tensor
`data` views have the shapes GGUFReader gives (numpy order; quantized and BF16 tensors as rows of bytes).

Every page of the mapping a reader touches stays in the process's resident set until it is unmapped, so
reading a 47 GB model tensor by tensor would end with the whole model resident (clean pages the kernel may
drop, but counted as the process's memory): `release(tensor)` gives a tensor's pages back once it is read.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from tbpw.errors import TbpwError
from tbpw.files.digest import PerFile
from tbpw.model.ggml_types import ExtraType, block_and_size, ggml_type

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorLayout:
    name: str
    shape: tuple[int, ...]  # ggml order, ne0 first (as GGUFReader's `shape`)
    tensor_type: GGMLQuantizationType | ExtraType  # `.name` and `.value` either way
    data_offset: int  # absolute
    n_bytes: int
    data: np.ndarray  # memory-mapped view


@dataclass
class GgufLayout:
    path: Path
    version: int
    fields: dict[str, Any]  # scalar and string values; arrays as ("array", item type, length)
    tensors: list[TensorLayout]
    data_offset: int
    alignment: int
    # byte range [start, end) of each key/value entry (key, type and value) in the file, in file order
    kv_spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    infos_end: int = 0  # where the tensor infos end (before the padding to `alignment`)
    mapping: mmap.mmap | None = field(default=None, repr=False)

    def release(self, tensor: TensorLayout) -> None:
        """Drop this process's mapped pages of `tensor` (the page cache keeps them; a later read maps them again)."""
        advice = getattr(mmap, "MADV_DONTNEED", None)  # not on every platform
        if advice is None or self.mapping is None or self.mapping.closed:
            return
        start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        stop = min(len(self.mapping), -(-(tensor.data_offset + tensor.n_bytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
        if stop > start:
            self.mapping.madvise(advice, start, stop - start)

    def kv_bytes(self, key: str) -> bytes:
        """The raw bytes of one key/value entry, as the file stores it."""
        start, end = self.kv_spans[key]
        with open(self.path, "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)

    @property
    def architecture(self) -> str:
        arch = self.fields.get("general.architecture")
        return arch if isinstance(arch, str) else "unknown"


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = bytes(self.buf[self.pos:self.pos + n])
        if len(raw) != n:
            raise struct.error("string runs past the end of the file")
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        buf, pos = self.buf, self.pos
        for _ in range(count):
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + n
        if pos > len(buf):
            raise struct.error("array runs past the end of the file")
        self.pos = pos

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if itype in _SCALARS:
                self.pos += struct.calcsize(_SCALARS[itype]) * count
            elif itype == _STRING:
                self.skip_strings(count)
            else:  # arrays of arrays: rare, walk them
                for _ in range(count):
                    self.value(itype)
            return ("array", itype, count)
        raise struct.error(f"unknown GGUF value type {vtype}")


@dataclass(frozen=True)
class _Header:
    version: int
    fields: dict[str, Any]
    spans: dict[str, tuple[int, int]]
    infos: list[tuple[str, tuple[int, ...], int, int]]  # name, dims, ggml type, offset
    end: int


# Stepping over a large vocabulary's strings is most of an open: the few most recent headers are kept.
_HEADERS: PerFile[_Header] = PerFile(keep=4)


def read(path: Path | str) -> GgufLayout:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        mm = np.frombuffer(mapping, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise TbpwError(f"{path} cannot be read ({exc}): give a .gguf model") from exc
    header = _HEADERS.get(path, lambda: _parse_header(path, mm))
    version, fields, spans, infos = header.version, header.fields, header.spans, header.infos
    alignment = int(fields.get("general.alignment", _DEFAULT_ALIGNMENT) or _DEFAULT_ALIGNMENT)
    infos_end = header.end
    data_offset = -(-infos_end // alignment) * alignment
    tensors = []
    for name, dims, ttype, offset in infos:
        try:
            qtype = ggml_type(ttype)
        except ValueError:
            raise TbpwError(f"{path}: tensor {name} has ggml type {ttype}, unknown to the gguf package: update gguf") from None
        blck, size = block_and_size(qtype.name)
        n_elements = int(np.prod(dims)) if dims else 1
        n_bytes = n_elements // blck * size
        start = data_offset + offset
        if start + n_bytes > mm.size:
            raise TbpwError(f"{path} is truncated: tensor {name} runs past the end of the file")
        raw = mm[start:start + n_bytes]
        np_shape = tuple(reversed(dims))
        data: np.ndarray
        if qtype == GGMLQuantizationType.F32:
            data = raw.view(np.float32).reshape(np_shape)
        elif qtype == GGMLQuantizationType.F16:
            data = raw.view(np.float16).reshape(np_shape)
        else:  # rows of bytes, as GGUFReader shows quantized (and BF16) tensors
            data = raw.reshape(*np_shape[:-1], np_shape[-1] // blck * size)
        tensors.append(TensorLayout(name, dims, qtype, start, n_bytes, data))
    return GgufLayout(path=path, version=version, fields=dict(fields), tensors=tensors, data_offset=data_offset,
                      alignment=alignment, kv_spans=dict(spans), infos_end=infos_end, mapping=mapping)


def _parse_header(path: Path, mm: np.ndarray) -> _Header:
    cur = _Cursor(mm.data)  # the mapped bytes as a memoryview
    try:
        if bytes(mm[:4]) != b"GGUF":
            raise TbpwError(f"{path} is not a GGUF file (no GGUF magic): give a .gguf model")
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise TbpwError(f"{path} is GGUF version {version}; tbpw reads versions 2 and 3 (little-endian): re-convert the model")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        fields: dict[str, Any] = {}
        spans: dict[str, tuple[int, int]] = {}
        for _ in range(n_kv):
            start = cur.pos
            key = cur.string()
            fields[key] = cur.value(cur.unpack("<I"))
            spans[key] = (start, cur.pos)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            dims = tuple(cur.unpack("<Q") for _ in range(n_dims))
            ttype, offset = cur.unpack("<I"), cur.unpack("<Q")
            infos.append((name, dims, ttype, offset))
    except struct.error as exc:
        raise TbpwError(f"{path} is a damaged GGUF file ({exc})") from exc
    return _Header(version, fields, spans, infos, cur.pos)
