"""Reading importance matrices: GGUF (`<t>.in_sum2`, `<t>.counts`, optional `<t>.in_sum`, `<t>.stats`) and legacy .dat.

Per weight tensor the file holds, for every expert (one for a 2-D tensor), the sums over calibration
tokens of each input column's a^2 (and, from the fork's or tbpw's collector, of a) and the token count.
From them:

- E[a^2] = in_sum2 / counts: the importance weights llama-quantize hands to ggml (`importance`, `sq`);
- E[a]   = in_sum / counts, where the file has `in_sum` (`mean`);
- experts that saw no token (count 0) get E[a^2] = 1 and E[a] = 0, as llama-quantize does.

Divisions are done in float32 exactly as llama-quantize does them, so the weights are bit-identical.

    imx = Imatrix.load("model.imatrix.gguf")
    imx.names(); imx.sq("blk.0.ffn_down.weight")  # [n_expert, ncols]
    report = imx.check_against(inventory)        # missing tensors are reported, wrong widths raise
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tbpw.errors import TbpwError, os_error
from tbpw.files.digest import PerFile, content_sha256

if TYPE_CHECKING:
    from tbpw.model.inventory import ModelInventory

# Order of the fork's 12 `.stats` values when the file has no `imatrix.stats_schema` key.
DEFAULT_STATS_SCHEMA = ("sum_sq", "mean", "elements", "std_deviation", "skewness", "kurtosis", "gain",
                        "h_norm", "l2_dist", "cossim", "pearson", "covariance")


@dataclass
class ImatrixEntry:
    name: str
    in_sum2: np.ndarray  # float32 [n_expert, ncols] (legacy files: E[a^2] * ncall, see Imatrix.legacy)
    counts: np.ndarray  # float32 [n_expert]
    in_sum: np.ndarray | None = None  # float32 [n_expert, ncols]
    stats: dict[str, float] | None = None  # the fork's per-tensor statistics, by schema name

    @property
    def n_experts(self) -> int:
        return self.in_sum2.shape[0]

    @property
    def ncols(self) -> int:
        return self.in_sum2.shape[1]


@dataclass
class ImatrixMatch:
    """How an imatrix lines up with a model: what is used, what the model lacks data for, what is extra."""

    used: list[str]
    missing: list[str]  # quantizable model tensors without data (quantized without importance)
    extra: list[str]  # imatrix entries naming no tensor of the model (ignored)


_LOADED: PerFile[Imatrix] = PerFile(keep=1)  # the last imatrix loaded


@dataclass
class Imatrix:
    path: Path
    entries: dict[str, ImatrixEntry]
    format: str  # "gguf" or "dat"
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    # ----- loading -----

    @classmethod
    def load(cls, path: Path | str) -> Imatrix:
        path = Path(path)
        if path.is_dir():
            raise TbpwError(f"imatrix file {path} is a folder: give the imatrix file")
        if not path.is_file():
            raise TbpwError(f"imatrix file {path} does not exist: check the path or make one with llama-imatrix")
        try:
            with open(path, "rb") as fh:
                magic = fh.read(4)
        except OSError as exc:
            raise os_error(exc, "read the imatrix", path) from None

        def load() -> Imatrix:
            loaded = _load_gguf(path) if magic == b"GGUF" else _load_dat(path)
            _check_values(loaded)
            return loaded

        # gguf's reader takes ~30 ms on a small model's imatrix, for every plan a run writes; nothing changes a
        # loaded imatrix
        return _LOADED.get(path, load)

    # ----- queries -----

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> ImatrixEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise TbpwError(f"imatrix {self.path} has no data for {name}") from None

    @property
    def legacy(self) -> bool:
        return self.format == "dat"

    @cached_property
    def has_means(self) -> bool:
        """True when the file records activation sums (E[a]): the fork's and tbpw's collectors do, stock does not."""
        return any(e.in_sum is not None for e in self.entries.values())

    @cached_property
    def has_stats(self) -> bool:
        return any(e.stats for e in self.entries.values())

    def counts(self, name: str) -> np.ndarray:
        """Tokens seen per expert, float32 [n_expert]."""
        return self.entry(name).counts.copy()

    def importance(self, name: str) -> np.ndarray:
        """The float32 weights llama-quantize passes to ggml for this tensor: [n_expert, ncols]."""
        e = self.entry(name)
        if self.legacy:
            ncall = float(e.counts[0])
            if ncall > 0:
                return (e.in_sum2 / np.float32(ncall)).astype(np.float32)
            return e.in_sum2.astype(np.float32, copy=True)
        counts = _rounded(e.counts)
        out = np.ones_like(e.in_sum2, dtype=np.float32)
        seen = counts > 0
        out[seen] = e.in_sum2[seen] / counts[seen, None]
        return out

    def sq(self, name: str) -> np.ndarray:
        """E[a^2] per expert and input column, float32 [n_expert, ncols] (= `importance`)."""
        return self.importance(name)

    def mean(self, name: str) -> np.ndarray | None:
        """E[a] per expert and input column, float32 [n_expert, ncols], or None when the file has no in_sum."""
        e = self.entry(name)
        if e.in_sum is None:
            return None
        counts = _rounded(e.counts)
        out = np.zeros_like(e.in_sum, dtype=np.float32)
        seen = counts > 0
        out[seen] = e.in_sum[seen] / counts[seen, None]
        return out

    def stats(self, name: str) -> dict[str, float] | None:
        """The fork's `.stats` values of the tensor by name (sum_sq, h_norm, l2_dist, cossim, ...), or None."""
        e = self.entries.get(name)
        return dict(e.stats) if e is not None and e.stats else None

    def content_hash(self) -> str:
        """sha256 of the file: what a cache of measurements keys on (any change to the data invalidates it)."""
        return content_sha256(self.path)

    # ----- matching a model -----

    def check_against(self, inventory: ModelInventory) -> ImatrixMatch:
        """Check every entry's width and expert count against the model.

        A wrong width or expert count raises (the imatrix was made for another model); quantizable tensors
        without data are returned in `missing` (token_embd never has data; llama-quantize goes on without).
        Legacy .dat entries store experts flattened: they are reshaped here to [n_expert, ncols].
        """
        used, extra = [], []
        for name, e in sorted(self.entries.items()):
            info = inventory.by_name.get(name)
            if info is None:
                extra.append(name)
                continue
            if self.legacy and e.n_experts == 1 and info.n_experts > 1 and e.ncols == info.row_length * info.n_experts:
                e.in_sum2 = e.in_sum2.reshape(info.n_experts, info.row_length)
                e.counts = np.repeat(e.counts[:1], info.n_experts).astype(np.float32)
            if e.ncols != info.row_length:
                raise TbpwError(f"imatrix {self.path.name} has {e.ncols} columns for {name}, the model's rows have "
                                f"{info.row_length}: this imatrix belongs to another model; make one for {inventory.path.name}")
            if e.n_experts != info.n_experts:
                raise TbpwError(f"imatrix {self.path.name} has data for {e.n_experts} experts of {name}, the model has "
                                f"{info.n_experts}: this imatrix belongs to another model; make one for {inventory.path.name}")
            used.append(name)
        missing = [t.name for t in inventory.tensors if t.quantizable and t.name not in self.entries]
        if inventory.tensors and not used:
            raise TbpwError(f"imatrix {self.path.name} names none of the tensors of {inventory.path.name}: "
                            "it belongs to another model; make one for this model")
        return ImatrixMatch(used=used, missing=missing, extra=extra)


def _check_values(imx: Imatrix) -> None:
    """Refuse data no collector writes: negative or non-finite sums or counts, a tensor whose squared
    activations are all zero although it saw tokens, a file in which no tensor saw any token."""
    fix = "the imatrix is damaged or was not made by llama-imatrix; make it again"
    for name, e in imx.entries.items():
        for what, values in (("in_sum2", e.in_sum2), ("counts", e.counts), ("in_sum", e.in_sum)):
            if values is None:
                continue
            if not np.all(np.isfinite(values)):
                raise TbpwError(f"imatrix {imx.path.name}: {name}.{what} holds NaN or infinite values: {fix}")
            if what != "in_sum" and np.any(values < 0):
                raise TbpwError(f"imatrix {imx.path.name}: {name}.{what} holds negative values, which a sum of squares "
                                f"or a count cannot be: {fix}")
        seen = e.counts.reshape(-1) > 0
        if seen.any() and not np.any(e.in_sum2[seen]):
            raise TbpwError(f"imatrix {imx.path.name}: every E[a^2] of {name} is zero although it saw tokens, which "
                            f"would give its quantization no importance to go by: {fix}")
    if imx.entries and not any(np.any(e.counts > 0) for e in imx.entries.values()):
        raise TbpwError(f"imatrix {imx.path.name}: no tensor saw any token (every count is zero): make it again "
                        "from calibration text with llama-imatrix")


def _rounded(counts: np.ndarray) -> np.ndarray:
    # llama.cpp's loader stores counts as integers (lround) and divides by them as float.
    return np.rint(counts).astype(np.float32)


def _load_gguf(path: Path) -> Imatrix:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:
        raise TbpwError(f"{path} is not a readable GGUF imatrix ({exc}): recompute it with llama-imatrix") from exc

    def field_value(key: str):
        f = reader.get_field(key)
        return None if f is None else f.contents()

    schema = field_value("imatrix.stats_schema") or list(DEFAULT_STATS_SCHEMA)
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        for suffix in (".in_sum2", ".in_sum", ".counts", ".stats"):
            if t.name.endswith(suffix):
                if t.tensor_type.name != "F32":
                    raise TbpwError(f"{path}: {t.name} is {t.tensor_type.name}, imatrix data must be F32: recompute the imatrix")
                parts.setdefault(t.name[: -len(suffix)], {})[suffix] = np.array(t.data, dtype=np.float32)
                break
    if not parts:
        raise TbpwError(f"{path} holds no imatrix data (no <tensor>.in_sum2 / .counts): is it a model file?")
    entries = {}
    for name, p in parts.items():
        if ".in_sum2" not in p or ".counts" not in p:
            raise TbpwError(f"{path}: {name} lacks its in_sum2 or counts tensor: the imatrix is damaged; recompute it")
        counts = p[".counts"].reshape(-1)
        n_expert = counts.size
        sums2 = p[".in_sum2"]
        if sums2.size % n_expert:
            raise TbpwError(f"{path}: {name} has {sums2.size} sums for {n_expert} experts: the imatrix is damaged")
        sums2 = sums2.reshape(n_expert, -1)
        in_sum = p.get(".in_sum")
        if in_sum is not None:
            if in_sum.size != sums2.size:
                raise TbpwError(f"{path}: {name}.in_sum and .in_sum2 differ in size: the imatrix is damaged")
            in_sum = in_sum.reshape(sums2.shape)
        stats = None
        if ".stats" in p:
            values = p[".stats"].reshape(-1)
            stats = {key: float(v) for key, v in zip(schema, values)}
        entries[name] = ImatrixEntry(name, sums2, counts.astype(np.float32), in_sum, stats)
    datasets = field_value("imatrix.datasets") or []
    return Imatrix(path=path, entries=entries, format="gguf", datasets=list(datasets),
                   chunk_count=int(field_value("imatrix.chunk_count") or 0),
                   chunk_size=int(field_value("imatrix.chunk_size") or 0))


def _load_dat(path: Path) -> Imatrix:
    """The legacy format: i32 n; per entry i32 len, name, i32 ncall, i32 nval, f32[nval] (E[a^2] * ncall);
    then optionally i32 chunk count, i32 len, dataset name."""
    data = path.read_bytes()
    bad = TbpwError(f"{path} is neither a GGUF imatrix nor a legacy .dat imatrix: recompute it with llama-imatrix")
    try:
        (n,) = struct.unpack_from("<i", data, 0)
        if n < 1 or n > 1_000_000:
            raise bad
        off = 4
        entries = {}
        for _ in range(n):
            (length,) = struct.unpack_from("<i", data, off)
            off += 4
            if length <= 0 or length > 4096:
                raise bad
            name = data[off:off + length].decode("utf-8")
            off += length
            ncall, nval = struct.unpack_from("<ii", data, off)
            off += 8
            if nval < 1:
                raise bad
            values = np.frombuffer(data, dtype="<f4", count=nval, offset=off).astype(np.float32)
            off += 4 * nval
            entries[name] = ImatrixEntry(name, values.reshape(1, nval), np.array([ncall], dtype=np.float32))
        chunk_count, datasets = 0, []
        if off + 8 <= len(data):
            chunk_count, length = struct.unpack_from("<ii", data, off)
            off += 8
            if 0 < length <= len(data) - off:
                datasets = [data[off:off + length].decode("utf-8", "replace")]
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise bad from exc
    return Imatrix(path=path, entries=entries, format="dat", datasets=datasets, chunk_count=chunk_count)
