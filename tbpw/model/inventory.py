"""Tensor inventory of a GGUF model and exact byte / bpw accounting, fallbacks included.

The file is memory-mapped (tbpw.model.gguf_layout, which steps over metadata arrays); nothing loads a whole
model. Byte sizes follow stock llama-quantize exactly: a type whose block does not divide the row
length falls back the way llama-quantize falls back, and the bytes are those of the type actually written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from tbpw.errors import TbpwError
from tbpw.files.digest import content_sha256
from tbpw.model import gguf_layout
from tbpw.model.ggml_types import effective_type, row_bytes

# Substrings that stop stock llama.cpp from quantizing a tensor (tensor_allows_quantization, b11312),
# for the architectures tbpw targets; exact-name exclusions are below.
_NOT_QUANTIZED_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd",
    "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)


_NOT_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")


_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.weight|\.bias)?$")


def stock_allows_quantization(name: str, n_dims: int) -> bool:
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if name in _NOT_QUANTIZED_NAMES:
        return False
    return not any(s in name for s in _NOT_QUANTIZED_SUBSTRINGS)


def role_of(name: str) -> tuple[int | None, str]:
    """(layer index, role) of a tensor name: ("blk.3.ffn_down_exps.weight") -> (3, "ffn_down_exps")."""
    if m := _BLOCK_NAME.match(name):
        return int(m.group(1)), m.group(2)
    base = name.removesuffix(".weight").removesuffix(".bias")
    return None, base


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length (ne0)
    stored_type: str
    data_offset: int  # absolute offset of the tensor data in the file
    stored_bytes: int
    quantizable: bool
    layer: int | None
    role: str

    @property
    def row_length(self) -> int:
        return self.shape[0]

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.row_length

    @property
    def n_experts(self) -> int:
        return self.shape[2] if len(self.shape) >= 3 else 1

    @property
    def rows_per_expert(self) -> int:
        return self.shape[1] if len(self.shape) >= 2 else 1

    @property
    def is_expert(self) -> bool:
        return len(self.shape) >= 3

    def effective_type(self, t: str) -> str:
        return effective_type(t, self.row_length)

    def bytes_as(self, t: str) -> int:
        """Exact bytes of this tensor's data once written as `t` (after stock fallbacks)."""
        return self.n_rows * row_bytes(self.effective_type(t), self.row_length)


@dataclass
class ModelInventory:
    path: Path
    tensors: list[TensorInfo]
    metadata_bytes: int  # everything before the tensor data (header, key/values, tensor infos, padding)
    alignment: int
    architecture: str
    _reader: gguf_layout.GgufLayout = field(repr=False)

    @classmethod
    def load(cls, path: Path | str) -> ModelInventory:
        path = Path(path)
        if path.is_dir():
            raise TbpwError(f"model file {path} is a folder: give the GGUF file (convert a Hugging Face folder "
                            "with a recipe's model.path)")
        if not path.is_file():
            raise TbpwError(f"model file {path} does not exist: check the path")
        # gguf_layout steps over metadata arrays: GGUFReader needs tens of seconds for a 262k-token vocabulary
        reader = gguf_layout.read(path)
        arch = reader.architecture
        tensors = []
        for t in reader.tensors:
            shape = tuple(int(x) for x in t.shape)
            layer, role = role_of(t.name)
            tensors.append(TensorInfo(name=t.name, shape=shape, stored_type=t.tensor_type.name,
                                      data_offset=int(t.data_offset), stored_bytes=int(t.n_bytes),
                                      quantizable=stock_allows_quantization(t.name, len(shape)),
                                      layer=layer, role=role))
        return cls(path=path, tensors=tensors, metadata_bytes=int(reader.data_offset),
                   alignment=int(reader.alignment), architecture=arch, _reader=reader)

    @cached_property
    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def __getitem__(self, name: str) -> TensorInfo:
        try:
            return self.by_name[name]
        except KeyError:
            raise TbpwError(f"tensor {name!r} is not in {self.path}") from None

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def tensor_bytes(self, types: Mapping[str, str] | None = None) -> int:
        """Bytes of all tensor data with `types` applied (tensors not named keep their stored type)."""
        types = types or {}
        return sum(t.bytes_as(types[t.name]) if t.name in types else t.stored_bytes for t in self.tensors)

    def bpw(self, types: Mapping[str, str] | None = None) -> float:
        """8 x all tensor bytes / all elements, metadata excluded (the fork's definition)."""
        return 8.0 * self.tensor_bytes(types) / self.n_elements

    def file_bytes(self, types: Mapping[str, str] | None = None) -> int:
        """Size of the file with `types` applied: metadata plus each tensor padded to the alignment."""
        types = types or {}
        pad = lambda n: -(-n // self.alignment) * self.alignment  # noqa: E731
        data = sum(pad(t.bytes_as(types[t.name]) if t.name in types else t.stored_bytes) for t in self.tensors)
        return self.metadata_bytes + data

    def types(self) -> dict[str, str]:
        return {t.name: t.stored_type for t in self.tensors}

    def metadata(self, key: str) -> Any:
        """A scalar or string key/value of the file (None when absent; an array as ("array", item type, length))."""
        return self._reader.fields.get(key)

    def release(self, name: str) -> None:
        """Give back the memory-mapped pages of a tensor read through `rows` (see gguf_layout): whoever reads
        a model tensor by tensor calls it after each one, so its resident memory does not grow with the model."""
        self._reader.release(next(t for t in self._reader.tensors if t.name == name))

    def rows(self, name: str, rows: np.ndarray | slice | None = None, expert: int | None = None) -> np.ndarray:
        """Float32 rows of a tensor (of one expert for 3-D tensors), dequantized when stored quantized."""
        info = self[name]
        tensor = next(t for t in self._reader.tensors if t.name == name)
        data = tensor.data
        if info.is_expert:
            if expert is None:
                raise TbpwError(f"{name} is a 3-D expert tensor: ask for the rows of one expert")
            data = data[expert]
        else:
            data = data.reshape(-1, data.shape[-1]) if info.stored_type in ("F32", "F16", "BF16") else data
        picked = data if rows is None else data[rows]
        if info.stored_type in ("F32", "F16"):
            return np.asarray(picked, dtype=np.float32)
        out = dequantize(np.asarray(picked), GGMLQuantizationType[info.stored_type])
        return np.asarray(out, dtype=np.float32).reshape(-1, info.row_length)


def fingerprint(inventory: ModelInventory) -> str:
    """sha256 of the whole model file, so that any edited weight makes another cache entry.

    Remembered while the file's device, inode, size, mtime and ctime stay the same (tbpw.files.digest), so a
    model is read once, not at every measurement.
    """
    return content_sha256(inventory.path)

