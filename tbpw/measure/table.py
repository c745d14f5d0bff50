"""The error table: per tensor and candidate type, exact bytes and a measured error.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tbpw.errors import TbpwError
from tbpw.files.atomic import write_json, write_text
from tbpw.measure import candidates as cand

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
        if not isinstance(data, Mapping) or "tensors" not in data:
            raise TbpwError("not an error table (no `tensors` list): give a file written by `tbpw measure --out`")
        return cls(tensors=[TensorErrors.from_json(t) for t in data["tensors"]], meta=dict(data.get("meta", {})))

    def write_json(self, path: Path | str) -> None:
        write_json(path, self.to_json())

    @classmethod
    def read_json(cls, path: Path | str) -> ErrorTable:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise TbpwError(f"cannot read error table {path} ({exc})") from exc

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

