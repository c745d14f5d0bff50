"""Counting the weights an F16 conversion would clip."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from tbpw.f16check import count_safetensors


def _bf16(values: np.ndarray) -> np.ndarray:
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    header, blobs, offset = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        raw = arr.tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_counts_overflow_and_underflow_of_matrices_only(tmp_path: Path):
    weights = np.array([[1.0, 70000.0, -1e6, 1e-9], [0.0, -3e-9, 0.5, 2.0]], dtype=np.float32)
    norm = np.array([1e6, 1e-12], dtype=np.float32)  # 1-D: stays F32 in the GGUF, never counted
    _write_safetensors(tmp_path / "model.safetensors",
                       {"w": ("BF16", _bf16(weights)), "w32": ("F32", weights), "norm": ("BF16", _bf16(norm))})
    count = count_safetensors(tmp_path)
    assert (count.overflow, count.underflow, count.values) == (4, 4, 16)
    assert count.clips and set(count.worst) == {"w", "w32"}
    assert "4 of 16 weights overflow" in count.summary()


def test_clean_model_does_not_clip(tmp_path: Path):
    _write_safetensors(tmp_path / "a.safetensors", {"w": ("BF16", _bf16(np.linspace(-3, 3, 64).reshape(8, 8)))})
    assert not count_safetensors(tmp_path).clips
