"""Outputs never land on inputs: a command refuses, before any work, to write over a file it reads."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from tbpw.errors import TbpwError


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        try:
            return os.path.samefile(a, b)  # hard links and symlinks included
        except OSError:
            pass
    return a.resolve() == b.resolve()


def refuse_overwriting_inputs(outputs: Mapping[str, Path | str | None], inputs: Mapping[str, Path | str | None]) -> None:
    """Raise one line when a file the command would write (`outputs`: what -> path) is one of its inputs
    (`inputs`: what -> path), or when an output path is an existing folder."""
    given_inputs = {what: Path(p) for what, p in inputs.items() if p is not None}
    for out_what, out in outputs.items():
        if out is None:
            continue
        out = Path(out)
        if out.is_dir():
            raise TbpwError(f"{out_what} {out} is a folder: give a file path")
        for in_what, source in given_inputs.items():
            if _same(out, source):
                raise TbpwError(f"{out_what} {out} is the {in_what} this command reads: writing it would destroy "
                                "the input; give another output path")
