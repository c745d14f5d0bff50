"""Make an importance matrix with stock llama-imatrix or tbpw's own collector: one function, same arguments."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tbpw.errors import TbpwError
from tbpw.files.atomic import temporary_folder
from tbpw.files.outputs import refuse_overwriting_inputs
from tbpw.llamacpp import progress, resources
from tbpw.llamacpp.build import BuildInfo, active_build
from tbpw.llamacpp.collector import run_collector
from tbpw.llamacpp.offload import offload_args
from tbpw.llamacpp.tools import run_tool

COLLECTORS = ("stock", "tbpw")


@dataclass(frozen=True)
class ImatrixRun:
    path: Path
    collector: str
    seconds: float
    log_path: Path


def imatrix_args(model: Path, text: Path | str, out: Path, *, ctx: int, chunks: int | None,
                 threads: int | None, build: BuildInfo, ngl: int | None = None,
                 extra_args: Sequence[str] = ()) -> list[str]:
    """The argument list both collectors take: the collector mirrors llama-imatrix's flags."""
    args = ["-m", str(model), "-f", str(text), "-o", str(out), "-c", str(ctx)]
    if chunks is not None:
        args += ["--chunks", str(chunks)]
    if (threads := resources.threads(threads)) is not None:
        args += ["-t", str(threads)]
    return args + offload_args(build, ngl) + [str(a) for a in extra_args]


def make_imatrix(model: Path | str, text: Path | str, out: Path | str, collector: str = "stock",
                 chunks: int | None = None, ctx: int = 512, threads: int | None = None,
                 extra_args: Sequence[str] = (), *, ngl: int | None = None, log_path: Path | str | None = None,
                 build: BuildInfo | None = None, timeout: float | None = None) -> ImatrixRun:
    """Run `collector` over `text` in chunks of `ctx` tokens and write a GGUF imatrix to `out`.

    "stock" is llama-imatrix (in_sum2 and counts); "tbpw" is tbpw's collector, which writes the same
    in_sum2 and counts and also in_sum (so E[a] is known). `text` is recorded in the file by its name alone
    (imatrix.datasets; the tool runs in the text's folder), so that no quant made with it, which copies that
    record, names a local folder. The file appears at `out` only when the run succeeded.
    """
    if collector not in COLLECTORS:
        raise TbpwError(f"unknown imatrix collector {collector!r}: use one of {', '.join(COLLECTORS)}")
    model, out = Path(model), Path(out)
    for what, path in (("model", model), ("calibration text", Path(text))):
        if not path.is_file():
            raise TbpwError(f"the {what} {path} does not exist: check the path")
    log_path = Path(log_path) if log_path is not None else out.with_name(out.name + ".log")
    refuse_overwriting_inputs({"output": out, "log": log_path}, {"model": model, "calibration text": text})
    if ctx < 1:
        raise TbpwError(f"ctx must be a positive number of tokens, got {ctx}")
    if chunks is not None and chunks < 1:
        raise TbpwError(f"chunks must be at least 1, got {chunks} (leave it out to use the whole text)")
    build = build or active_build()
    # llama-imatrix rewrites its output every few chunks: let it write inside a private folder, and
    # move the finished file into place.
    work = temporary_folder(out)
    try:
        partial = work / (out.stem + ".gguf")
        text = Path(text).resolve()
        args = imatrix_args(model.resolve(), Path(text.name), partial.resolve(), ctx=ctx, chunks=chunks,
                            threads=threads, build=build, ngl=ngl, extra_args=extra_args)
        if collector == "stock":
            run = run_tool("llama-imatrix", args, log_path=log_path, build=build, timeout=timeout,
                           meter=progress.IMATRIX.expecting(chunks), cwd=text.parent)
        else:
            run = run_collector(args, log_path=log_path, build=build, timeout=timeout,
                                meter=progress.COLLECTOR.expecting(chunks), cwd=text.parent)
        if not partial.is_file():
            raise TbpwError(f"{collector} collector exited without writing an imatrix (log: {run.log_path})")
        os.replace(partial, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ImatrixRun(path=out, collector=collector, seconds=run.seconds, log_path=run.log_path)
