"""The error table: per tensor and candidate type, exact bytes and a measured error.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tbpw.errors import TbpwError, os_error
from tbpw.files.atomic import write_json, write_text
from tbpw.files.digest import content_sha256
from tbpw.measure import candidates as cand
from tbpw.model.ggml_types import type_name

TABLE_FORMAT = "tbpw-error-table"


@dataclass(frozen=True)
class CandidateError:
    type: str
    bytes: int
    error: float


@dataclass
class TensorErrors:
    name: str
    n_elements: int
    candidates: list[CandidateError]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "n_elements": self.n_elements,
                "candidates": [{"type": c.type, "bytes": c.bytes, "error": c.error} for c in self.candidates]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorErrors:
        return cls(name=data["name"], n_elements=int(data["n_elements"]),
                   candidates=[CandidateError(c["type"], int(c["bytes"]), float(c["error"])) for c in data["candidates"]])

    def candidate(self, type_name: str) -> CandidateError:
        for c in self.candidates:
            if c.type == type_name:
                return c
        raise TbpwError(f"{type_name} is not a candidate of {self.name}")


@dataclass
class ErrorTable:
    tensors: list[TensorErrors]
    meta: dict[str, Any] = field(default_factory=dict)

    def by_name(self) -> dict[str, TensorErrors]:
        return {t.name: t for t in self.tensors}

    def to_json(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "version": 1, "meta": self.meta, "tensors": [t.to_json() for t in self.tensors]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ErrorTable:
        """The table `data` holds, refused (one line naming the tensor and the candidate) when an allocator could
        not trust it: an unknown type, an error below 0 or not finite, a tensor listed twice."""
        if not isinstance(data, Mapping) or not isinstance(data.get("tensors"), list):
            raise TbpwError("not an error table (no `tensors` list): give a file written by `tbpw measure --out`")
        try:
            table = cls(tensors=[TensorErrors.from_json(t) for t in data["tensors"]], meta=dict(data.get("meta") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise TbpwError(f"a damaged error table ({type(exc).__name__}: {exc} in a tensor entry): give a file "
                            "written by `tbpw measure --out`, or measure again") from None
        if problem := table.problem():
            raise TbpwError(f"{problem}: fix that entry, or measure again with `tbpw measure --out`")
        return table

    def problem(self) -> str:
        """The first entry no allocator can use ("" when there is none). Every reader of a saved table checks
        it, so that a hand-edited or foreign table fails here, naming the entry, rather than as a KeyError deep
        in a plan or as a silently wrong one (a negative error is a free upgrade to the allocators)."""
        seen: set[str] = set()
        for t in self.tensors:
            if t.name in seen:
                return f"tensor {t.name} is listed twice"
            seen.add(t.name)
            for c in t.candidates:
                try:
                    type_name(c.type)
                except (KeyError, ValueError):
                    return (f"tensor {t.name}, candidate {c.type!r}: not a ggml type (names such as Q4_K, IQ3_S, "
                            "Q8_0, BF16)")
                if not math.isfinite(c.error) or c.error < 0:
                    return f"tensor {t.name}, candidate {c.type}: the error {c.error!r} is not a finite number >= 0"
        return ""

    def write_json(self, path: Path | str) -> None:
        """Write the table, unless it holds an entry `read_json` would refuse: a table tbpw wrote is one it reads."""
        if problem := self.problem():
            metric = self.meta.get("metric")
            raise TbpwError(f"error table {path} not written: {problem}" + (f" (metric {metric})" if metric else "")
                            + ": every candidate needs a ggml type and a finite error >= 0, once per tensor")
        write_json(path, self.to_json())

    @classmethod
    def read_json(cls, path: Path | str) -> ErrorTable:
        path = Path(path)
        if path.is_dir():
            raise TbpwError(f"error table {path} is a folder: give the JSON file `tbpw measure --out` wrote")
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except OSError as exc:
            raise os_error(exc, "read the error table", path) from None
        except ValueError as exc:  # not JSON, or not text at all
            raise TbpwError(f"error table {path} is not JSON ({exc}): give a file written by `tbpw measure --out`") from None
        except TbpwError as exc:
            raise TbpwError(f"error table {path}: {exc}") from None

    def check_model(self, model: Path | str, source: str = "the error table") -> None:
        """Refuse a table measured on another model, even one whose tensors have the same names and shapes:
        tables written by `tbpw measure` record the sha256 of the model file they measured."""
        recorded = self.meta.get("model_sha256")
        if recorded and recorded != content_sha256(model):
            raise TbpwError(f"{source} was measured on another model than {model} (its recorded model sha256 "
                            f"{str(recorded)[:12]}... differs), though its tensors may have the same shapes: measure "
                            f"{Path(model).name} with `tbpw measure`")

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["tensor", "n_elements", "type", "bytes", "bpw", "error"])
        for t in self.tensors:
            for c in t.candidates:
                writer.writerow([t.name, t.n_elements, c.type, c.bytes, f"{8.0 * c.bytes / t.n_elements:.6f}", repr(c.error)])
        return out.getvalue()

    def write_csv(self, path: Path | str) -> None:
        write_text(path, self.to_csv())

    def pareto(self, convex: bool = True) -> ErrorTable:
        """The same table reduced per tensor as the fork reduces it (see candidates.fork_pareto)."""
        return ErrorTable([TensorErrors(t.name, t.n_elements, cand.fork_pareto(t.candidates, convex)) for t in self.tensors],
                          dict(self.meta, reduced="fork-pareto" + ("" if convex else "-monotone")))

    @classmethod
    def from_fork_state(cls, state) -> ErrorTable:
        """The candidates of a fork state file (tbpw.measure.forkstate.ForkState) as an error table."""
        tensors = [TensorErrors(t.name, t.n_elements, [CandidateError(c.type, c.bytes, c.error) for c in t.candidates])
                   for t in state.tensors]
        return cls(tensors, {"source": "fork-state", "model_id": f"{state.model_id:016x}"})

