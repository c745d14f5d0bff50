"""ctypes bridge to libggml-base of the active build: the very quantization code llama-quantize runs.

`ggml_quantize_chunk` turns float rows into the bytes llama-quantize writes (bit-exact when given the
same importance weights), and each type's `to_float` turns them back. A failed ggml assertion aborts
the whole Python process, so every argument is checked here, in Python, before the call.

ctypes releases the GIL during a foreign call, so several threads quantizing at once run in parallel.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from tbpw.errors import TbpwError

# Types ggml_quantize_chunk can write. Others (Q8_1, Q8_K, deprecated slots) hit an assertion.
QUANTIZABLE = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "IQ1_M", "TQ1_0", "TQ2_0",
    "MXFP4",
)

# Types whose lookup grids ggml_quantize_init builds on first use (seconds each; IQ1_M shares IQ1_S's). It builds
# them under ggml's one global mutex, which every ggml_quantize_chunk call also takes: while a grid is being
# built, no other thread can quantize through ggml_quantize_chunk. The other quantized types are called through
# their own exported quantize_<type> functions (what ggml_quantize_chunk dispatches to: the same bytes), which
# take no lock, so they run on while a grid is being built.
GRID_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "IQ3_XXS", "IQ3_S")

# Types stock llama-quantize refuses to write without importance data (tensor_requires_imatrix, b11312;
# token_embd and output are exempt there). libggml itself only insists for IQ1_S, IQ2_XXS and IQ2_XS.
STOCK_REQUIRES_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS")


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits (ggml.h, ggml 0.25.x)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@dataclass(frozen=True)
class TypeTraits:
    name: str
    id: int
    block_size: int
    type_size: int  # bytes of one block
    is_quantized: bool
    can_dequantize: bool
    requires_imatrix: bool  # libggml asserts without importance weights
    stock_requires_imatrix: bool  # stock llama-quantize refuses it without imatrix data

    @property
    def nominal_bpw(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n_per_row: int) -> int:
        if n_per_row <= 0 or n_per_row % self.block_size:
            raise TbpwError(f"a row of {n_per_row} values does not fit {self.name} blocks of {self.block_size}")
        return n_per_row // self.block_size * self.type_size


class Ggml:
    """One loaded libggml-base. Use `load()` to get the one of the active build."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            lib = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise TbpwError(f"cannot load {self.path} ({exc}): run `tbpw build` again") from exc
        self._lib = lib
        lib.ggml_type_name.restype = ctypes.c_char_p
        lib.ggml_type_name.argtypes = [ctypes.c_int]
        lib.ggml_blck_size.restype = ctypes.c_int64
        lib.ggml_blck_size.argtypes = [ctypes.c_int]
        lib.ggml_type_size.restype = ctypes.c_size_t
        lib.ggml_type_size.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.restype = None
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_validate_row_data.restype = ctypes.c_bool
        lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        self._to_float: dict[str, Callable[..., None]] = {}  # _TO_FLOAT instances
        self._init_lock = threading.Lock()
        self._initialised: set[str] = set()
        # quantize_<type>(src, dst, nrows, n_per_row, imatrix) -> bytes written, for the types without grids
        self._direct: dict[str, Callable[..., int]] = {}
        for name in QUANTIZABLE:
            if name in GRID_TYPES or name in ("F32", "F16", "BF16"):
                continue
            # ggml's names: quantize_q4_K, quantize_iq4_xs, quantize_q8_0, ...
            symbol = "quantize_" + (name[:-2].lower() + "_K" if name.endswith("_K") else name.lower())
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype = ctypes.c_size_t
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
                self._direct[name] = fn

    # ----- types -----

    @cached_property
    def types(self) -> dict[str, TypeTraits]:
        """Traits of every type this library can quantize, read from the library itself.

        Enum values come from gguf's GGMLQuantizationType and are checked against the library's own
        names, so a build whose enum differs fails here rather than writing the wrong type.
        """
        out: dict[str, TypeTraits] = {}
        for name in QUANTIZABLE:
            try:
                tid = GGMLQuantizationType[name].value
            except KeyError:
                continue
            raw = self._lib.ggml_type_name(tid)
            if raw is None or raw.decode().upper() != name:
                continue
            tr = self._lib.ggml_get_type_traits(tid).contents
            out[name] = TypeTraits(name=name, id=tid, block_size=int(tr.blck_size), type_size=int(tr.type_size),
                                   is_quantized=bool(tr.is_quantized),
                                   can_dequantize=bool(tr.to_float) or name == "F32",
                                   requires_imatrix=bool(self._lib.ggml_quantize_requires_imatrix(tid)),
                                   stock_requires_imatrix=name in STOCK_REQUIRES_IMATRIX)
        if "Q4_K" not in out or "F16" not in out:
            raise TbpwError(f"{self.path} does not look like libggml-base (type names do not match): run `tbpw build` again")
        return out

    def traits(self, type_name: str) -> TypeTraits:
        try:
            return self.types[type_name.upper()]
        except KeyError:
            raise TbpwError(f"ggml type {type_name!r} cannot be quantized by {self.path.name}; "
                            f"use one of {', '.join(self.types)}") from None

    def row_bytes(self, type_name: str, n_per_row: int) -> int:
        t = self.traits(type_name)
        expected = t.row_bytes(n_per_row)
        got = int(self._lib.ggml_row_size(t.id, n_per_row))
        if got != expected:  # the library is the authority; a mismatch means the traits above are stale
            raise TbpwError(f"libggml reports {got} bytes per {type_name} row of {n_per_row}, expected {expected}")
        return got

    def requires_imatrix(self, type_name: str) -> bool:
        """True where libggml cannot quantize without importance weights."""
        return self.traits(type_name).requires_imatrix

    # ----- quantize / dequantize -----

    def _ensure_init(self, t: TypeTraits) -> None:
        # The IQ grids are built on first use; doing it once up front keeps worker threads from queueing on it.
        if t.name not in self._initialised:
            with self._init_lock:
                if t.name not in self._initialised:
                    self._lib.ggml_quantize_init(t.id)
                    self._initialised.add(t.name)

    def needs_grid(self, type_name: str) -> bool:
        """True while `type_name` still has a lookup grid to build before it can quantize."""
        return type_name.upper() in GRID_TYPES and type_name.upper() not in self._initialised

    def prepare(self, type_names: list[str] | tuple[str, ...]) -> None:
        """Build the grids these types need now (one after the other; other types keep quantizing meanwhile)."""
        for name in type_names:
            if name.upper() in self.types:
                self._ensure_init(self.traits(name))

    def quantize(self, type_name: str, rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """Quantize float32 rows [n_rows, n_per_row] to `type_name`; returns uint8 [n_rows, row_bytes].

        `importance` is one float32 weight per column (E[a^2] of the input, as llama-quantize passes it) or None.
        """
        t = self.traits(type_name)
        rows = _check_rows(rows, t)
        n_rows, n_per_row = rows.shape
        row_bytes = self.row_bytes(t.name, n_per_row)
        weights = None
        if importance is not None:
            weights = np.ascontiguousarray(importance, dtype=np.float32)
            if weights.shape != (n_per_row,):
                raise TbpwError(f"importance weights have shape {weights.shape}, rows have {n_per_row} columns")
            if not np.all(np.isfinite(weights)):
                raise TbpwError("importance weights contain NaN or infinity: the imatrix is damaged; recompute it")
        elif t.requires_imatrix:
            raise TbpwError(f"{t.name} cannot be quantized without an imatrix: give --imatrix or drop {t.name} from the candidates")
        out = np.empty((n_rows, row_bytes), dtype=np.uint8)
        if n_rows == 0:
            return out
        imatrix = None if weights is None else weights.ctypes.data
        direct = self._direct.get(t.name)
        if direct is not None:
            written = direct(rows.ctypes.data, out.ctypes.data, n_rows, n_per_row, imatrix)
        else:
            self._ensure_init(t)
            written = self._lib.ggml_quantize_chunk(t.id, rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, imatrix)
        if written != out.nbytes:
            raise TbpwError(f"ggml_quantize_chunk wrote {written} bytes for {t.name}, expected {out.nbytes}")
        return out

    def dequantize(self, type_name: str, data: np.ndarray, n_per_row: int) -> np.ndarray:
        """Float32 rows [n_rows, n_per_row] from the bytes of `type_name` rows."""
        t = self.traits(type_name)
        row_bytes = self.row_bytes(t.name, n_per_row)
        data = np.ascontiguousarray(data, dtype=np.uint8)
        if data.size % row_bytes:
            raise TbpwError(f"{data.size} bytes are not a whole number of {t.name} rows of {row_bytes} bytes")
        n_rows = data.size // row_bytes
        if t.name == "F32":
            return data.view(np.float32).reshape(n_rows, n_per_row).copy()
        fn = self._to_float_fn(t)
        out = np.empty((n_rows, n_per_row), dtype=np.float32)
        if n_rows:
            fn(data.ctypes.data, out.ctypes.data, n_rows * n_per_row)
        return out

    def roundtrip(self, type_name: str, rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """Rows after quantize + dequantize: what a model written as `type_name` computes with."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        return self.dequantize(type_name, self.quantize(type_name, rows, importance), rows.shape[1])

    def validate(self, type_name: str, data: np.ndarray) -> bool:
        """ggml_validate_row_data: False when the bytes hold NaN/inf scales (llama-quantize aborts then)."""
        t = self.traits(type_name)
        data = np.ascontiguousarray(data, dtype=np.uint8)
        if data.size % t.type_size:
            raise TbpwError(f"{data.size} bytes are not a whole number of {t.name} blocks")
        return bool(self._lib.ggml_validate_row_data(t.id, data.ctypes.data, data.size))

    def _to_float_fn(self, t: TypeTraits):
        fn = self._to_float.get(t.name)
        if fn is None:
            ptr = self._lib.ggml_get_type_traits(t.id).contents.to_float
            if not ptr:
                raise TbpwError(f"libggml has no dequantizer for {t.name}")
            fn = _TO_FLOAT(ptr)
            self._to_float[t.name] = fn
        return fn


def _check_rows(rows: np.ndarray, t: TypeTraits) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 2:
        raise TbpwError(f"rows to quantize must be a 2-D array [n_rows, n_per_row], got shape {rows.shape}")
    if rows.shape[1] == 0 or rows.shape[1] % t.block_size:
        raise TbpwError(f"rows of {rows.shape[1]} values do not fit {t.name} blocks of {t.block_size}: "
                        f"use a type whose block size divides the row (llama-quantize falls back the same way)")
    return np.ascontiguousarray(rows, dtype=np.float32)


_loaded: dict[Path, Ggml] = {}
_loaded_lock = threading.Lock()


def load(path: Path | str | None = None) -> Ggml:
    """libggml-base of the active build (or the one at `path`), loaded once per process."""
    if path is None:
        from tbpw.llamacpp.build import active_build

        path = active_build().library("ggml-base")
    path = Path(path).resolve()
    with _loaded_lock:
        if path not in _loaded:
            _loaded[path] = Ggml(path)
        return _loaded[path]
