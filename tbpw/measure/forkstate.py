"""Reading (and writing) the target-bpw fork's `--state-file` format ("BPW-V2").

Layout, little-endian, as measured on the fork's own output (its state file of a tiny test model):

    u64  magic            the bytes "BPW-V2" read as an integer
    u64  model_id         a hash of the GGUF metadata (the fork's only cache key: a known flaw)
    u64  n_tensors
    per tensor:
      u32 name_length, name bytes (UTF-8)
      u64 n_candidates
      i32 chosen_index    index into the candidates of the last plan
      f32 chosen_bpw
      f32 source_bpw      bpw of the tensor as stored in the input (16 for F16)
      u64 n_elements
      per candidate: i32 ggml type, f32 bpw, u64 bytes, f64 error

The candidates are the ones the fork kept after its own filters (compatibility, fallbacks, duplicates),
sorted by bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType

from tbpw.errors import TbpwError, os_error
from tbpw.files.atomic import write_bytes

# The fork writes the constant 0x4250572D5632 ("BPW-V2" read big-endian) as a little-endian u64,
# so the file starts with the bytes "2V-WPB\0\0".
MAGIC = int.from_bytes(b"BPW-V2", "big")
_HEAD = struct.Struct("<QiffQ")
_CAND = struct.Struct("<ifQd")


@dataclass(frozen=True)
class ForkCandidate:
    type: str  # ggml type name, e.g. "Q4_K"
    bpw: float
    bytes: int
    error: float


@dataclass(frozen=True)
class ForkTensorState:
    name: str
    n_elements: int
    chosen_index: int
    chosen_bpw: float
    source_bpw: float
    candidates: tuple[ForkCandidate, ...]


@dataclass(frozen=True)
class ForkState:
    model_id: int
    tensors: tuple[ForkTensorState, ...]

    def by_name(self) -> dict[str, ForkTensorState]:
        return {t.name: t for t in self.tensors}


def read(path: Path | str) -> ForkState:
    if Path(path).is_dir():
        raise TbpwError(f"{path} is a folder: give the fork's state file")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise os_error(exc, "read the state file", path) from None
    if len(data) < 24 or int.from_bytes(data[:8], "little") != MAGIC:
        raise TbpwError(f"{path} is not a target-bpw state file (no BPW-V2 magic)")
    try:
        model_id, n_tensors = struct.unpack_from("<QQ", data, 8)
        offset = 24
        tensors = []
        for _ in range(n_tensors):
            (name_len,) = struct.unpack_from("<I", data, offset)
            offset += 4
            name = data[offset:offset + name_len].decode("utf-8")
            offset += name_len
            n_cand, chosen, chosen_bpw, source_bpw, n_elements = _HEAD.unpack_from(data, offset)
            offset += _HEAD.size
            cands = []
            for _ in range(n_cand):
                ttype, bpw, nbytes, error = _CAND.unpack_from(data, offset)
                offset += _CAND.size
                cands.append(ForkCandidate(GGMLQuantizationType(ttype).name, bpw, nbytes, error))
            tensors.append(ForkTensorState(name, n_elements, chosen, chosen_bpw, source_bpw, tuple(cands)))
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise TbpwError(f"{path} is a damaged target-bpw state file ({exc})") from exc
    if offset != len(data):
        raise TbpwError(f"{path} has {len(data) - offset} unexpected trailing bytes: not a BPW-V2 state file of this layout")
    return ForkState(model_id, tuple(tensors))


def write(path: Path | str, state: ForkState) -> None:
    parts = [struct.pack("<QQQ", MAGIC, state.model_id, len(state.tensors))]
    for t in state.tensors:
        name = t.name.encode("utf-8")
        parts.append(struct.pack("<I", len(name)) + name)
        parts.append(_HEAD.pack(len(t.candidates), t.chosen_index, t.chosen_bpw, t.source_bpw, t.n_elements))
        for c in t.candidates:
            parts.append(_CAND.pack(GGMLQuantizationType[c.type].value, c.bpw, c.bytes, c.error))
    write_bytes(path, b"".join(parts))
