"""What a GGUF holds, for `tbpw inspect`: its exact bpw, its type mix per role, how it was made.

Works on any GGUF: a file tbpw wrote shows its provenance (tbpw.model.provenance), a file another tool
wrote shows what llama-quantize and the converter recorded (`quantize.imatrix.*`, `general.*`) and its types.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tbpw.errors import TbpwError
from tbpw.model import gguf_layout, provenance
from tbpw.model.inventory import ModelInventory

# general.* keys worth showing (the converter writes them from the source's model card)
GENERAL_KEYS = ("general.name", "general.basename", "general.size_label", "general.license", "general.file_type",
                "general.base_model.0.repo_url", "general.source.repo_url")


@dataclass(frozen=True)
class RoleMix:
    """The tensors of one role (attn_q, ffn_down_exps, token_embd, ...) and the types they are stored in."""

    role: str
    tensors: int
    elements: int
    bytes: int
    types: dict[str, int]  # type -> tensors, most tensors first

    @property
    def bpw(self) -> float:
        return 8.0 * self.bytes / self.elements if self.elements else 0.0


@dataclass(frozen=True)
class GgufSummary:
    path: Path
    architecture: str
    file_bytes: int
    metadata_bytes: int
    n_tensors: int
    n_elements: int
    tensor_bytes: int
    roles: list[RoleMix]
    types: dict[str, tuple[int, int]]  # type -> (tensors, bytes), most bytes first
    provenance: dict[str, str]  # tbpw.* fields, empty when tbpw did not write the file
    imatrix: dict[str, Any]  # quantize.imatrix.* keys llama-quantize recorded
    general: dict[str, Any] = field(default_factory=dict)

    @property
    def bpw(self) -> float:
        """8 x all tensor bytes / all elements, metadata excluded (what tbpw's targets mean)."""
        return 8.0 * self.tensor_bytes / self.n_elements if self.n_elements else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "architecture": self.architecture, "file_bytes": self.file_bytes,
                "metadata_bytes": self.metadata_bytes, "tensors": self.n_tensors, "elements": self.n_elements,
                "tensor_bytes": self.tensor_bytes, "bpw": self.bpw, "provenance": self.provenance,
                "imatrix": self.imatrix, "general": self.general,
                "types": {t: {"tensors": n, "bytes": b} for t, (n, b) in self.types.items()},
                "roles": [{"role": r.role, "tensors": r.tensors, "elements": r.elements, "bytes": r.bytes,
                           "bpw": r.bpw, "types": r.types} for r in self.roles]}


def summarize(path: Path | str) -> GgufSummary:
    """Read `path` (metadata and tensor infos only) and describe it."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:  # else it reads as a file that cannot be mapped, as if unreadable
        raise TbpwError(f"{path} is empty, not a GGUF file: give a .gguf model")
    inventory = ModelInventory.load(path)
    fields = gguf_layout.read(path).fields
    by_role: dict[str, list] = {}
    for t in inventory.tensors:
        by_role.setdefault(t.role, []).append(t)
    roles = []
    for role, tensors in by_role.items():
        counted = Counter(t.stored_type for t in tensors)
        roles.append(RoleMix(role, len(tensors), sum(t.n_elements for t in tensors), sum(t.stored_bytes for t in tensors),
                             dict(sorted(counted.items(), key=lambda kv: (-kv[1], kv[0])))))
    per_type: dict[str, list[int]] = {}
    for t in inventory.tensors:
        count = per_type.setdefault(t.stored_type, [0, 0])
        count[0] += 1
        count[1] += t.stored_bytes
    types = {t: (n, b) for t, (n, b) in sorted(per_type.items(), key=lambda kv: (-kv[1][1], kv[0]))}
    return GgufSummary(
        path=path, architecture=inventory.architecture, file_bytes=path.stat().st_size,
        metadata_bytes=inventory.metadata_bytes, n_tensors=len(inventory.tensors), n_elements=inventory.n_elements,
        tensor_bytes=inventory.tensor_bytes(), roles=roles, types=types, provenance=provenance.read(fields),
        imatrix={k.removeprefix("quantize.imatrix."): v for k, v in fields.items() if k.startswith("quantize.imatrix.")},
        general={k: v for k in GENERAL_KEYS if (v := fields.get(k)) is not None})
