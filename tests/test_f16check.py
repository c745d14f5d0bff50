"""Counting the weights an F16 conversion would clip."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tbpw.model.f16check import count_safetensors


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


@pytest.mark.tools  # `tbpw run` looks for the build before it converts
def test_run_refuses_f16_when_weights_would_clip(tmp_path: Path, wiki_text: Path):
    from click.testing import CliRunner

    from tbpw.cli import main

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    _write_safetensors(folder / "model.safetensors", {"w": ("BF16", _bf16(np.array([[1.0, 1e5]], dtype=np.float32)))})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: clip
model: {{path: {folder}}}
datasets:
  calibration: {{name: file, options: {{path: {wiki_text}}}}}
  evaluation: {{name: file, options: {{path: {wiki_text}}}}}
targets: [{{bpw: 4}}]
""")
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert "F16 would clip" in line and "1 of 2 weights overflow" in line and "model.outtype: bf16" in line
    assert not (tmp_path / "runs" / "clip" / "model").exists()
