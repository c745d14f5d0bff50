"""Before BF16/F32 weights become F16: count the values F16 cannot hold.

F16's largest finite value is 65504; magnitudes under 2^-25 round to zero. A model with such weights
loses them silently in an F16 GGUF, so the pipeline refuses F16 unless the recipe allows the clipping.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

F16_MAX = 65504.0
F16_ZERO_BELOW = 2.0 ** -25


@dataclass
class ClipCount:
    overflow: int = 0  # |x| > 65504: becomes inf
    underflow: int = 0  # 0 < |x| < 2^-25: becomes 0
    values: int = 0
    worst: dict[str, tuple[int, int]] = field(default_factory=dict)  # tensor -> (overflow, underflow)

    @property
    def clips(self) -> bool:
        return self.overflow > 0 or self.underflow > 0

    def add(self, name: str, values: np.ndarray) -> None:
        mags = np.abs(values.astype(np.float32, copy=False))
        over = int(np.count_nonzero(mags > F16_MAX))
        under = int(np.count_nonzero((mags > 0) & (mags < F16_ZERO_BELOW)))
        self.values += values.size
        self.overflow += over
        self.underflow += under
        if over or under:
            self.worst[name] = (over, under)

    def summary(self) -> str:
        where = ", ".join(f"{n} ({o} over, {u} under)" for n, (o, u) in sorted(self.worst.items())[:5])
        more = f" and {len(self.worst) - 5} more tensors" if len(self.worst) > 5 else ""
        return (f"{self.overflow} of {self.values} weights overflow F16 and {self.underflow} underflow to zero"
                + (f": {where}{more}" if where else ""))


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def count_safetensors(folder: Path, chunk: int = 1 << 24) -> ClipCount:
    """Scan every BF16/F32 tensor of the *.safetensors files in a Hugging Face folder."""
    count = ClipCount()
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
        data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_len)
        for name, info in header.items():
            # 1-D tensors (norms, biases) stay F32 in a GGUF: only matrices become F16.
            if name == "__metadata__" or info["dtype"] not in ("BF16", "F32") or len(info["shape"]) < 2:
                continue
            start, end = info["data_offsets"]
            dtype = np.uint16 if info["dtype"] == "BF16" else np.float32
            values = data[start:end].view(dtype)
            for lo in range(0, values.size, chunk):
                part = values[lo:lo + chunk]
                count.add(name, _bf16_to_f32(part) if dtype is np.uint16 else part)
    return count


def count_gguf(path: Path) -> ClipCount:
    """Scan the BF16 and F32 matrices of a GGUF file (what a requantization to F16 would convert)."""
    from gguf import GGUFReader

    count = ClipCount()
    for t in GGUFReader(path).tensors:
        if t.tensor_type.name == "BF16":
            count.add(t.name, _bf16_to_f32(np.asarray(t.data).view(np.uint16).ravel()))
        elif t.tensor_type.name == "F32" and len(t.shape) >= 2:
            count.add(t.name, np.asarray(t.data).ravel())
    return count
