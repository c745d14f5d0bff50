"""llama-quantize, two ways: stock with a complete `--tensor-type-file`, or the fork's `--target-bpw` mode.

Facts about stock llama-quantize (b11312) this module relies on:
- `--tensor-type-file` is read token by token (whitespace separates entries; there is no comment
  syntax); each entry is `PATTERN=TYPE`, the pattern is lower-cased, compiled as an ECMAScript regex
  and *searched* in the tensor name; the first matching pattern wins;
- the overrides only apply when the base TYPE argument is a quantized type (an F16/BF16/F32 base
  copies every tensor), and the usual fallback for rows that do not fit a type's blocks still applies;
- with an imatrix it adds `quantize.imatrix.*` keys to the output's metadata (the file path as given,
  the first dataset name, both truncated to 127 bytes, the entry count and the chunk count);
- `--override-kv KEY=str:VALUE` (repeatable) adds or replaces a string key in the output's metadata (tbpw
  records its provenance that way); the key runs to the first `=`, and a key or value over 127 bytes makes
  it print its usage and exit 1 without saying why, so `kv_override_args` refuses one first.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tbpw.errors import TbpwError
from tbpw.llamacpp import progress, resources
from tbpw.llamacpp.build import BuildInfo, active_build
from tbpw.llamacpp.quantize_layout import imatrix_name
from tbpw.llamacpp.tools import ToolRun, run_tool

if TYPE_CHECKING:
    from tbpw.model.budget import Target

# A quantized base type that never needs imatrix data by itself; every tensor that could use it is
# named in the tensor-type file anyway, so it only sets the file's general.file_type.
BASE_TYPE = "Q8_0"
_SAFE = re.compile(r"[a-z0-9_]")
_KV_MAX_STR = 127


def tensor_pattern(name: str) -> str:
    """`^name$` as a regex that still matches only `name` after llama-quantize lower-cases it.

    Lower-case letters, digits and `_` stand for themselves, a dot is `\\.`; every other character
    (upper-case letters, `=` and whitespace, which the file format would split on) becomes an `\\xHH`
    escape, whose hex digits survive lower-casing.
    """
    out = []
    for ch in name:
        if _SAFE.fullmatch(ch):
            out.append(ch)
        elif ch == ".":
            out.append("\\.")
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        else:
            raise TbpwError(f"tensor name {name!r} has a non-ASCII character, which llama-quantize's "
                            "--tensor-type-file cannot name exactly: rename the tensor")
    return "^" + "".join(out) + "$"


def tensor_type_text(types: Mapping[str, str]) -> str:
    """The content of a --tensor-type-file naming every tensor in `types`, one entry a line."""
    return "".join(f"{tensor_pattern(name)}={t.lower()}\n" for name, t in types.items())


def kv_override_args(kv: Mapping[str, str]) -> list[str]:
    """`--override-kv KEY=str:VALUE` for each string key, checked against llama-quantize's limits."""
    args = []
    for key, value in kv.items():
        if "=" in key or not key or len(key.encode()) > _KV_MAX_STR:
            raise TbpwError(f"metadata key {key!r} cannot be written by llama-quantize --override-kv: a key has "
                            f"1 to {_KV_MAX_STR} bytes and no '='; shorten it")
        if len(value.encode()) > _KV_MAX_STR or "\0" in value:
            raise TbpwError(f"the value of metadata key {key!r} has {len(value.encode())} bytes; llama-quantize "
                            f"--override-kv takes at most {_KV_MAX_STR} (and no NUL): shorten it")
        args += ["--override-kv", f"{key}=str:{value}"]
    return args


def quantize(model: Path | str, out: Path | str, *, imatrix: Path | str | None, tensor_type_file: Path | str | None = None,
             base_type: str = BASE_TYPE, threads: int | None = None, extra: list[str | os.PathLike] | None = None,
             kv: Mapping[str, str] | None = None, overrides: Sequence[str] = (), log_path: Path | str | None = None,
             build: BuildInfo | None = None) -> ToolRun:
    """Run llama-quantize MODEL OUT BASE_TYPE [threads] with the given options; `kv` adds string keys to the
    output's metadata (see `output_metadata` for what that costs), then `overrides` (`KEY=TYPE:VALUE`) follow. With an imatrix the tool runs in the imatrix's
    folder and is given its name (`imatrix_name`), which it records in the output: no quant names a local folder.
    Paths in `extra` are passed as paths (os.PathLike) so that they hold from there."""
    args: list[str | os.PathLike] = []
    cwd = None
    if imatrix is not None:
        cwd = Path(imatrix).resolve().parent
        args += ["--imatrix", imatrix_name(imatrix)]
    if tensor_type_file is not None:
        args += ["--tensor-type-file", Path(tensor_type_file).resolve()]
    args += kv_override_args(kv or {})
    args += [a for override in overrides for a in ("--override-kv", override)]
    args += [Path(a).resolve() if isinstance(a, os.PathLike) else a for a in extra or []]
    args += [Path(model).resolve(), Path(out).resolve(), base_type]
    if threads := resources.threads(threads):
        args.append(str(threads))
    return run_tool("llama-quantize", args, log_path=log_path, build=build, meter=progress.QUANTIZE, cwd=cwd)



# ---------------------------------------------------------------------------------------------------
# Size of the output's metadata (for --target-size)


def _kv_bytes(key: str, value_bytes: int) -> int:
    return 8 + len(key.encode()) + 4 + value_bytes


def _str_bytes(text: str) -> int:
    return 8 + len(text.encode("utf-8")[:_KV_MAX_STR])


@dataclass(frozen=True)
class OutputMetadata:
    """The metadata of the file llama-quantize writes from one model and imatrix, before `--override-kv` keys."""

    unpadded: int  # bytes of header, key/values and tensor infos
    alignment: int
    existing: Mapping[str, int]  # bytes of each key/value the output already has

    def size(self, kv: Mapping[str, str] | None = None) -> int:
        """Bytes before the tensor data once the string keys `kv` are set (`quantize(..., kv=kv)`)."""
        raw = self.unpadded
        for key, value in (kv or {}).items():
            new = _kv_bytes(key, 8 + len(value.encode("utf-8")))
            raw += new - self.existing.get(key, 0)  # a present key keeps its name and type, only its value changes
        return -(-raw // self.alignment) * self.alignment


def output_metadata_bytes(model: Path | str, imatrix: Path | str | None, kv: Mapping[str, str] | None = None) -> int:
    """Bytes before the tensor data in the file stock llama-quantize writes from `model` with `imatrix` and the
    string keys `kv` (header, key/values, tensor infos, padding): the input's, plus the keys llama-quantize sets."""
    return output_metadata(model, imatrix).size(kv)


def output_metadata(model: Path | str, imatrix: Path | str | None) -> OutputMetadata:
    """What `output_metadata_bytes` counts, kept to price several sets of `--override-kv` keys (reads `model`'s
    layout once: gguf's GGUFReader would spend seconds on the tokenizer's arrays of every plan written)."""
    from tbpw.model import gguf_layout

    layout = gguf_layout.read(model)
    end = layout.infos_end
    existing = {name: stop - start for name, (start, stop) in layout.kv_spans.items()}

    def set_value(key: str, value_bytes: int) -> int:
        # a present key keeps its name and type, only the value's size may change
        new = _kv_bytes(key, value_bytes)
        written[key] = new
        return new - existing[key] if key in existing else new

    written: dict[str, int] = dict(existing)

    delta = set_value("general.quantization_version", 4) + set_value("general.file_type", 4)
    for key in ("split.no", "split.count", "split.tensors.count"):
        delta -= existing.get(key, 0)
        written.pop(key, None)
    if imatrix is not None:
        from tbpw.imatrix.reader import Imatrix

        imx = Imatrix.load(imatrix)
        delta += set_value("quantize.imatrix.file", _str_bytes(imatrix_name(imatrix)))
        if imx.datasets:
            delta += set_value("quantize.imatrix.dataset", _str_bytes(imx.datasets[0]))
        delta += set_value("quantize.imatrix.entries_count", 4)
        if imx.chunk_count > 0:
            delta += set_value("quantize.imatrix.chunks_count", 4)
    return OutputMetadata(unpadded=end + delta, alignment=layout.alignment, existing=written)


# ---------------------------------------------------------------------------------------------------
# The fork's native target mode


def fork_state_path(model: Path | str, imatrix: Path | str, build: BuildInfo,
                    pins: Mapping[str, str] | None = None) -> Path:
    """Where tbpw keeps the fork's --state-file for this model, imatrix and build.

    The fork keys its state file on the model's metadata only, so a state file made with another imatrix
    would be reused silently; this path changes with the imatrix's content, the build and the pins.
    """
    import hashlib
    import json

    from tbpw.files import paths
    from tbpw.files.digest import sha256_file

    model = Path(model)
    with model.open("rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()  # the header, metadata and tensor infos, mostly
    parts = {"model": [head, model.stat().st_size], "imatrix": sha256_file(Path(imatrix)), "build": build.key,
             "pins": sorted((pins or {}).items())}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    return paths.fork_state_cache() / f"{key}.bpw_state"


def fork_target_types(model: Path | str, imatrix: Path | str, target: Target, *, pins: Mapping[str, str] | None = None,
                      threads: int | None = None, state_file: Path | str | None = None, reuse_state: bool = False,
                      log_dir: Path | str | None = None, build: BuildInfo | None = None) -> dict[str, str]:
    """Let the fork's llama-quantize choose every type for `target`, and read its choices back from
    the file it writes (which is then deleted). With `reuse_state` and no `state_file`, the fork's state
    file lives in tbpw's cache (fork_state_path), so later targets skip the fork's measurement."""
    from tbpw.llamacpp.features import ensure_tool_features
    from tbpw.model.inventory import ModelInventory

    build = build or active_build()
    flag = "--target-bpw" if target.bpw is not None else "--target-size"
    ensure_tool_features(flag, "--imatrix", purpose="the fork-native allocator", build=build)
    extra: list[str | os.PathLike] = [flag, repr(target.bpw) if target.bpw is not None else str(target.size)]
    for name, t in (pins or {}).items():
        extra += ["--tensor-type", f"{tensor_pattern(name)}={t.lower()}"]
    if not state_file and reuse_state:
        state_file = fork_state_path(model, imatrix, build, pins)
        state_file.parent.mkdir(parents=True, exist_ok=True)
    if state_file:
        extra += ["--state-file", Path(state_file)]  # a path: it holds from the folder llama-quantize runs in
    work = Path(tempfile.mkdtemp(prefix="tbpw-fork-"))
    try:
        out = work / "fork-native.gguf"
        # outside `work`, which goes: a failure's message names the log, so it must stay
        log = Path(log_dir) / "fork-native.log" if log_dir else None
        quantize(model, out, imatrix=imatrix, base_type=BASE_TYPE, threads=threads, extra=extra, log_path=log, build=build)
        written = ModelInventory.load(out)
        return {t.name: t.stored_type for t in written.tensors}
    finally:
        shutil.rmtree(work, ignore_errors=True)
