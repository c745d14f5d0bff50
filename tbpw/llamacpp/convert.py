"""Convert a Hugging Face model folder to GGUF with the pinned tree's own convert_hf_to_gguf.py.

The converter must run with the gguf-py and conversion/ packages of the same tree: the PyPI `gguf`
differs from the vendored one. It needs torch and transformers (the `convert` extra).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tbpw.errors import TbpwError
from tbpw.files.atomic import atomic_path
from tbpw.llamacpp import sources

OutType = Literal["f16", "bf16", "f32"]
NEEDED_MODULES = ("torch", "transformers", "safetensors", "sentencepiece", "numpy")
LOG_TAIL_LINES = 12


@dataclass(frozen=True)
class Conversion:
    output: Path
    log_path: Path
    seconds: float


def converter_tree(source: str | None = None) -> Path:
    """The llama.cpp tree whose converter runs (the pinned source by default; fetched if needed)."""
    tree = sources.prepare(sources.resolve(source))
    for needed in ("convert_hf_to_gguf.py", "gguf-py/gguf", "conversion"):
        if not (tree / needed).exists():
            raise TbpwError(f"the llama.cpp tree {tree} has no {needed}: use a complete llama.cpp source (tbpw build --source ...)")
    return tree


def missing_modules() -> list[str]:
    return [name for name in NEEDED_MODULES if importlib.util.find_spec(name) is None]


def convert_hf(model_dir: Path | str, output: Path | str, *, outtype: OutType = "f16",
               log_path: Path | str | None = None, source: str | None = None,
               timeout: float | None = None) -> Conversion:
    """Write `output` (a GGUF in `outtype`) from the Hugging Face model in `model_dir`."""
    model_dir, output = Path(model_dir), Path(output)
    if not (model_dir / "config.json").is_file():
        raise TbpwError(f"{model_dir} is not a Hugging Face model folder (no config.json): give the folder holding config.json and the weights")
    if missing := missing_modules():
        raise TbpwError(f"converting a Hugging Face model needs {', '.join(missing)}: pip install 'tbpw[convert]'")
    if outtype not in ("f16", "bf16", "f32"):
        raise TbpwError(f"unsupported conversion type {outtype!r}: use f16, bf16 or f32")
    tree = converter_tree(source)
    log_path = Path(log_path) if log_path else output.with_suffix(output.suffix + ".convert.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "gguf-py"), *filter(None, [env.get("PYTHONPATH")])])
    start = time.monotonic()
    with atomic_path(output) as tmp:
        argv = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model_dir),
                "--outfile", str(tmp), "--outtype", outtype]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", env=env,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise TbpwError(f"convert_hf_to_gguf.py did not finish within {timeout:.0f} s: raise the timeout") from exc
        seconds = time.monotonic() - start
        log_path.write_text(f"$ PYTHONPATH={env['PYTHONPATH']} {' '.join(argv)}\n===== stdout =====\n{proc.stdout}\n"
                            f"===== stderr =====\n{proc.stderr}\n===== exit {proc.returncode} after {seconds:.2f} s =====\n",
                            encoding="utf-8")
        if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-LOG_TAIL_LINES:])
            raise TbpwError(f"convert_hf_to_gguf.py failed on {model_dir}: {_reason(proc.stderr)} (log: {log_path})", details=tail)
    return Conversion(output, log_path, seconds)


def _reason(stderr: str) -> str:
    """The converter's last error line: a logged `ERROR:hf-to-gguf:...` or a traceback's exception."""
    for line in reversed(stderr.strip().splitlines()):
        if "error" in line.lower():
            return re.sub(r"^ERROR:[\w.-]+:", "", line.strip())[:200]
    return "see the log"
