"""A plan's GGUF from the tensor store: the file stock llama-quantize writes, in I/O time.

The header comes from `tbpw.llamacpp.quantize_layout` (llama-quantize's key/values, tensor order and
offsets), each tensor's data from the store (`tbpw.quantize.store`, quantized once per tensor and type) or,
when the plan keeps the stored type, straight from the input model, as llama-quantize copies it. Data is
streamed file to file (the kernel copies it where it can); nothing holds the model in memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tbpw.llamacpp.quantize_layout import FILE_TYPES, KvOverride, output_layout
from tbpw.model import gguf_layout
from tbpw.quantize.store import StoreSource

_COPY_BLOCK = 16 << 20


@dataclass(frozen=True)
class Assembled:
    path: Path
    file_bytes: int
    quantized: int  # tensors quantized into the store for this file (the others were found or copied)
    seconds: float


def unsupported(source: StoreSource, types: Mapping[str, str], base_type: str = "Q8_0") -> str | None:
    """Why the store cannot write this file (llama-quantize's job then), or None when it can."""
    if base_type not in FILE_TYPES:
        return f"the base type {base_type} (tbpw knows the file layout for {', '.join(FILE_TYPES)})"
    if "general.alignment" in gguf_layout.read(source.inventory.path).fields:
        return "the model sets general.alignment"
    stored = {t.name: t.stored_type for t in source.inventory.tensors}
    missing = sorted({t for name, t in types.items() if t != stored.get(name) and not source.supports(t)})
    return f"the libggml bridge cannot write {', '.join(missing)}" if missing else None


def assemble(source: StoreSource, types: Mapping[str, str], out: Path | str, *, base_type: str = "Q8_0",
             overrides: Sequence[str | KvOverride] = ()) -> Assembled:
    """Write `out` as `llama-quantize --tensor-type-file (types) [--imatrix] MODEL out BASE_TYPE` would.

    `out` is written in place (callers pass a temporary path and rename it once checked)."""
    start = time.monotonic()
    out = Path(out)
    layout = output_layout(gguf_layout.read(source.inventory.path), types, imatrix=source.imatrix_path,
                           base_type=base_type, overrides=overrides)
    before = source.quantized
    stored = {t.name: t for t in source.inventory.tensors}
    blobs = {p.name: source.ensure(p.name, p.type) for p in layout.tensors if p.type != stored[p.name].stored_type}
    with open(out, "wb") as dst, open(source.inventory.path, "rb") as model:
        dst.write(layout.header)
        for p in layout.tensors:
            if dst.tell() != p.offset:
                raise AssertionError(f"{p.name} would start at {dst.tell()}, its offset is {p.offset}")
            if p.name in blobs:
                with open(blobs[p.name], "rb") as blob:
                    _copy(blob, 0, dst, p.n_bytes)
            else:
                _copy(model, stored[p.name].data_offset, dst, p.n_bytes)
            pad = -p.n_bytes % 32
            if pad:
                dst.write(b"\0" * pad)
    return Assembled(out, out.stat().st_size, source.quantized - before, time.monotonic() - start)


def _copy(src, offset: int, dst, n_bytes: int) -> None:
    """Copy `n_bytes` of `src` from `offset` to the end of `dst` (both open binary files)."""
    dst.flush()
    left, pos = n_bytes, offset
    try:  # in the kernel where the file system allows it
        while left:
            done = os.copy_file_range(src.fileno(), dst.fileno(), left, pos)
            if done <= 0:
                break
            pos, left = pos + done, left - done
    except (AttributeError, OSError):
        pass
    dst.seek(0, os.SEEK_END)
    src.seek(pos)
    while left:
        block = src.read(min(_COPY_BLOCK, left))
        if not block:
            raise OSError(f"{src.name} ended {left} bytes early")
        dst.write(block)
        left -= len(block)
