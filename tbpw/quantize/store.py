"""A content-addressed store of quantized tensor data: each (model, tensor, type, imatrix, build) quantized once.

A blob holds exactly the bytes stock llama-quantize writes for one tensor as one type: the rows quantized by
libggml's `ggml_quantize_chunk` (the code llama-quantize runs) with the importance weights llama-quantize
derives from the imatrix (E[a^2] per expert, count-0 experts weighted 1). Its key covers everything those
bytes depend on: the model's fingerprint, the tensor, the type, the tensor's importance weights and the
llama.cpp build. Blobs are filled on demand (only the types some plan uses), written atomically, streamed
in slabs of rows (memory stays bounded whatever the tensor size), and quantized on several threads (ctypes
releases the GIL). `tbpw.quantize.assemble` streams them into a plan's GGUF.

    store = TensorStore()                               # $TBPW_HOME/store, or TensorStore(root)
    source = store.source("model-f16.gguf", "imatrix.gguf")
    path = source.ensure("blk.0.ffn_down.weight", "Q4_K")  # quantized now, or found

Layout: `<root>/<model fingerprint[:20]>/<key>.bin`; deleting a model's folder drops its blobs. Each blob has a
seal beside it (`<key>.bin.seal`: its size and sha256, hashed while it was written, tbpw.files.sealed): a blob
that is cut, changed or unrecorded is discarded, with a note, and quantized again before any plan uses it, and
the temporary file a killed writer left is swept when the model's folder is next opened (tbpw.files.atomic).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tbpw.errors import TbpwError
from tbpw.files import paths, sealed
from tbpw.files.atomic import sweep_folder, temporary_prefix
from tbpw.model.inventory import ModelInventory, TensorInfo, fingerprint

if TYPE_CHECKING:
    from tbpw.imatrix.reader import Imatrix
    from tbpw.llamacpp.build import BuildInfo
    from tbpw.llamacpp.ggml import Ggml

STORE_VERSION = 1
SLAB_BYTES = 64 << 20  # float32 rows quantized at once, per tensor
# Types stock llama-quantize refuses without importance data, except for these tensors (tensor_requires_imatrix).
_IMATRIX_EXEMPT = ("token_embd.weight", "per_layer_token_embd.weight", "output.weight")


def default_root() -> Path:
    """$TBPW_STORE, else <home>/store."""
    env = os.environ.get("TBPW_STORE")
    return Path(env).expanduser() if env else paths.home() / "store"


@dataclass
class TensorStore:
    """Where blobs live; `source(model, imatrix)` binds it to one float model and imatrix."""

    root: Path = field(default_factory=default_root)
    threads: int | None = None
    quantized_elements: int = 0  # tensor elements quantized into the store through it (for cost accounting)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def source(self, model: Path | str, imatrix: Path | str | None, *, build: BuildInfo | None = None) -> StoreSource:
        return StoreSource(self, ModelInventory.load(model), Path(imatrix) if imatrix is not None else None, build)


class StoreSource:
    """The blobs of one model quantized with one imatrix by one build."""

    def __init__(self, store: TensorStore, inventory: ModelInventory, imatrix: Path | None, build: BuildInfo | None):
        from tbpw.llamacpp.build import active_build

        self.store = store
        self.inventory = inventory
        self.imatrix_path = imatrix
        self.build = build or active_build()
        self.quantized = 0  # tensors quantized by this object (the rest were found)
        self._digests: dict[str, str | None] = {}

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.inventory)

    @cached_property
    def folder(self) -> Path:
        folder = self.store.root / self.fingerprint[:20]
        sweep_folder(folder)  # blobs a killed writer left half-written
        return folder

    @cached_property
    def imatrix(self) -> Imatrix | None:
        if self.imatrix_path is None:
            return None
        from tbpw.imatrix.reader import Imatrix

        imx = Imatrix.load(self.imatrix_path)
        imx.check_against(self.inventory)  # wrong widths raise; legacy expert entries are reshaped
        return imx

    @cached_property
    def lib(self) -> Ggml:
        from tbpw.llamacpp import ggml

        return ggml.load(self.build.library("ggml-base"))

    def supports(self, type_name: str) -> bool:
        """True when the bridge writes `type_name` (llama-quantize is the path for the others)."""
        return type_name.upper() in self.lib.types

    def importance(self, name: str) -> np.ndarray | None:
        """The weights llama-quantize gives ggml for `name` ([n_expert, ncols]), or None without data."""
        imx = self.imatrix
        if imx is None or name not in imx:
            return None
        weights = imx.importance(name)
        info = self.inventory[name]
        if weights.size != info.row_length * info.n_experts:
            if name in ("token_embd.weight", "per_layer_token_embd.weight"):
                return None  # llama-quantize ignores a wrong-size entry for the embeddings only
            raise TbpwError(f"imatrix size {weights.size} is different from tensor size "
                            f"{info.row_length * info.n_experts} for {name}: make the imatrix for this model")
        return weights.reshape(info.n_experts, info.row_length)

    def key(self, name: str, type_name: str) -> str:
        digests = self._digests
        if name not in digests:
            weights = self.importance(name)
            digests[name] = None if weights is None else hashlib.sha256(np.ascontiguousarray(weights).tobytes()).hexdigest()
        info = self.inventory[name]
        parts = {"v": STORE_VERSION, "model": self.fingerprint, "tensor": name, "shape": list(info.shape),
                 "stored": info.stored_type, "type": type_name.upper(), "importance": digests[name],
                 "build": self.build.key}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, name: str, type_name: str) -> Path:
        return self.folder / f"{self.key(name, type_name)}.bin"

    def has(self, name: str, type_name: str) -> bool:
        """Whether the blob is there and intact (a damaged one is discarded, with a note)."""
        return sealed.trusted(self.path(name, type_name), f"tensor store blob of {name} as {type_name.upper()}")

    def check(self, name: str, type_name: str) -> TensorInfo:
        """Raise what llama-quantize would refuse: a type the bridge cannot write, rows that do not fit it,
        a very-low-bit type without importance data, a quantized source."""
        info = self.inventory[name]
        t = type_name.upper()
        if not info.quantizable:
            raise TbpwError(f"llama-quantize never quantizes {name}: plan its stored type {info.stored_type}")
        traits = self.lib.traits(t)
        if info.row_length % traits.block_size:
            raise TbpwError(f"{name} has rows of {info.row_length}, which {t} blocks of {traits.block_size} do not divide: "
                            "plan the type llama-quantize falls back to")
        if info.stored_type not in ("F32", "F16", "BF16"):
            raise TbpwError(f"{name} is stored as {info.stored_type}: start from the F16/BF16/F32 model")
        if (traits.stock_requires_imatrix or traits.requires_imatrix) and name not in _IMATRIX_EXEMPT \
                and self.importance(name) is None:
            raise TbpwError(f"{name} as {t} needs importance data, and the imatrix has none for it: "
                            "give an imatrix with data for this tensor or plan another type")
        return info

    def open_blob(self, name: str, type_name: str) -> BlobWriter:
        """A blob written in pieces (rows in order): it appears only on `commit()`, and only if every byte came."""
        info = self.check(name, type_name)
        target = self.path(name, type_name)
        expected = info.n_rows * self.lib.row_bytes(type_name.upper(), info.row_length)
        return BlobWriter(target, expected, f"{name} as {type_name.upper()}")

    @contextmanager
    def writer(self, name: str, type_name: str) -> Iterator[BlobWriter]:
        """`open_blob` as a block: committed when it completes, discarded when it raises."""
        blob = self.open_blob(name, type_name)
        try:
            yield blob
            blob.commit()
        finally:
            blob.discard()

    def ensure(self, name: str, type_name: str) -> Path:
        """The blob of `name` as `type_name`: found intact, or quantized now (streamed in slabs, on the store's
        threads)."""
        path = self.path(name, type_name)
        if self.has(name, type_name):
            return path
        t = type_name.upper()
        info = self.check(name, t)
        weights = self.importance(name)
        threads = max(1, self.store.threads or os.cpu_count() or 1)
        slab = max(1, SLAB_BYTES // (4 * info.row_length))
        with self.writer(name, t) as out, ThreadPoolExecutor(max_workers=threads) as pool:
            for e in range(info.n_experts):
                imp = weights[e] if weights is not None else None
                for start in range(0, info.rows_per_expert, slab):
                    stop = min(start + slab, info.rows_per_expert)
                    rows = self.inventory.rows(name, slice(start, stop), expert=e if info.is_expert else None)
                    rows = np.ascontiguousarray(rows, dtype=np.float32)
                    step = -(-len(rows) // threads)
                    parts = [rows[i:i + step] for i in range(0, len(rows), step)]
                    for q in pool.map(lambda part, imp=imp: self.lib.quantize(t, part, imp), parts):
                        out.write(q)
                    del rows, parts
                    self.inventory.release(name)  # else every page read stays resident: the whole model by the end
        self.quantized += 1
        self.store.quantized_elements += info.n_elements
        return path


class BlobWriter:
    """One blob being written: a temporary file beside its place, renamed there by `commit`."""

    def __init__(self, target: Path, expected: int, what: str):
        self.target, self.expected, self.what = target, expected, what
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(target), suffix=".tmp", dir=target.parent)
        self.tmp = Path(tmp)
        self.fh = os.fdopen(fd, "wb")
        self.written = 0
        self.digest = hashlib.sha256()  # of the bytes as they are written: the seal costs no second read

    def write(self, data: np.ndarray | bytes) -> None:
        raw = np.ascontiguousarray(data).tobytes() if isinstance(data, np.ndarray) else bytes(data)
        self.fh.write(raw)
        self.digest.update(raw)
        self.written += len(raw)

    def commit(self) -> Path:
        self.fh.close()
        if self.written != self.expected:
            raise TbpwError(f"{self.written} bytes were written for {self.what}, expected {self.expected}")
        if self.target.is_dir():  # something that is no blob took its place: the blob is made, so it goes
            sealed.discard(self.target)
        # A blob's bytes follow from its key, so a seal already there (another process's) says the same as ours.
        os.replace(self.tmp, self.target)
        sealed.write_seal(self.target, self.digest.hexdigest(), self.written)
        return self.target

    def discard(self) -> None:
        """Drop what was written unless it was committed (safe to call twice)."""
        if not self.fh.closed:
            self.fh.close()
        self.tmp.unlink(missing_ok=True)
