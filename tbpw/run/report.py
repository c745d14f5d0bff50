"""The run's report: a typed record of every quant's numbers (`Report`), rendered as model-card tables in Markdown,
every number in JSON, and PNG plots.

Pure formatting of the entries the pipeline collected (each entry's numbers are the parsed tool outputs); only
`write_report` touches the disk. `tbpw.run.modelcard` renders the same `Report` as a Hugging Face model card.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tbpw.files.atomic import atomic_path, write_json, write_text
from tbpw.model.ggml_types import nominal_bpw
from tbpw.model.inventory import role_of
from tbpw.plugin.base import Column


def public_path(path: Path | str, root: Path | str) -> str:
    """A path as a published file records it: relative to the run directory `root` when inside it, else the file's
    name alone, so that no published file names a local folder (a user's home, their layout)."""
    path, root = Path(path), Path(root)
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return path.name


# An absolute path inside a text (a dataset's description, a note): its last part is kept.
_ABSOLUTE = re.compile(r"(?<![\w.~/:-])(?:~/|/)(?:[^\s/'\"`()]+/)+(?=[^\s/'\"`()]+)")


def public_text(text: str) -> str:
    """`text` with the folders of every absolute path in it taken out (`/home/me/data/wiki.txt` -> `wiki.txt`)."""
    return _ABSOLUTE.sub("", text)


def public_json(value: Any) -> Any:
    """`value` (a recipe, a dataset's record, notes) with every absolute path reduced to the file's name."""
    if isinstance(value, dict):
        return {k: public_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public_json(v) for v in value]
    if isinstance(value, str):
        return Path(value).name if Path(value).is_absolute() else public_text(value)
    return value


@dataclass
class Entry:
    """One row of the report: the float model (`kind` base), a stock type, one of tbpw's quants, or someone
    else's file (other)."""

    name: str
    kind: str  # base, stock, tbpw or other
    bpw: float | None
    size_bytes: int | None
    metrics: dict[str, Any] = field(default_factory=dict)  # evaluator column -> value
    bench: dict[str, float] = field(default_factory=dict)  # llama-bench test -> tokens per second
    bench_rows: list[dict] = field(default_factory=list)  # llama-bench's Markdown rows
    target: str | None = None
    allocator: str | None = None
    types: dict[str, str] = field(default_factory=dict)  # tensor -> type
    path: str | None = None  # in the run directory (`public_path`): the report publishes no local folder
    note: str = ""
    released: bool = False  # its GGUF was deleted after its evaluation (keep: chosen)
    selected: bool = False  # the best quant of its target

    def to_json(self) -> dict[str, Any]:
        if self.kind == "base":
            return {"name": self.name, "kind": self.kind, "bpw": self.bpw, "size_bytes": self.size_bytes,
                    "metrics": self.metrics, "bench": self.bench}
        return {"name": self.name, "kind": self.kind, "target": self.target, "allocator": self.allocator,
                "bpw": self.bpw, "size_bytes": self.size_bytes, "metrics": self.metrics, "bench": self.bench,
                "bench_rows": self.bench_rows, "types": self.types, "path": self.path,
                **({"note": self.note} if self.note else {}), **({"released": True} if self.released else {}),
                **({"selected": True} if self.selected else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class Report:
    """What a run found, as report.json records it."""

    name: str
    description: str
    model: str  # the float model: its path in the run directory, else its file name (`public_path`)
    build: str  # the llama.cpp build, in words
    notes: list[str]
    select_by: list[str]
    evaluation_text: str
    baseline_ppl: float
    substitutes: dict[str, str]  # dataset role -> what substitutes for the real benchmark
    columns: list[Column]
    entries: list[Entry]  # the baseline first, then the quants in the run's order
    tbpw_version: str
    recipe: dict[str, Any]  # the resolved recipe, as JSON
    provenance: dict[str, str]
    datasets: dict[str, dict[str, str]]  # role -> description, attribution, sha256
    source: dict[str, str]  # the source model: its name, hub id and licence where known
    overlap: dict[str, Any] = field(default_factory=dict)  # how much evaluation text the calibration text holds
    plots: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "model": self.model, "build": self.build,
                "notes": self.notes, "select_by": self.select_by, "evaluation_text": self.evaluation_text,
                "baseline_ppl": self.baseline_ppl, "substitutes": self.substitutes,
                "columns": [asdict(c) for c in self.columns], "entries": [e.to_json() for e in self.entries],
                "tbpw_version": self.tbpw_version, "recipe": self.recipe, "provenance": self.provenance,
                "datasets": self.datasets, "source": self.source, "overlap": self.overlap, "plots": self.plots}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        return cls(**{**{k: v for k, v in data.items() if k in cls.__dataclass_fields__},
                      "columns": [Column(**c) for c in data["columns"]],
                      "entries": [Entry.from_json(e) for e in data["entries"]]})

    def selected(self) -> list[Entry]:
        """The best quant of each target."""
        return [e for e in self.entries if e.selected]


# A file not made by the run whose first ranking column is this many times every quant the run made is suspect.
STRANGER_FACTOR = 10.0


def flag_strangers(entries: list[Entry], column: str) -> list[str]:
    """Note, on each file not made by the run, a `column` (lower is better) far above every quant the run made: it
    may be a quant of another model. Returns the warnings."""
    ours = [e.metrics[column] for e in entries if e.kind in ("stock", "tbpw") and e.metrics.get(column) is not None]
    if not ours:
        return []
    warnings = []
    for e in entries:
        value = e.metrics.get(column)
        if e.kind == "other" and value is not None and value > STRANGER_FACTOR * max(ours):
            doubt = (f"its {column} {value:.6g} is more than {STRANGER_FACTOR:g}x every quant this run made: it may "
                     "be a quant of another model")
            e.note = f"{e.note}; {doubt}" if e.note else doubt
            warnings.append(f"warning: {e.name}: {doubt}")
    return warnings


def fmt(value: Any, digits: int = 4, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def cell(metrics: dict, column: Column) -> str:
    """A column's value as the tables show it: `value ± error` when the evaluator reports its uncertainty."""
    value = metrics.get(column.key)
    error = metrics.get(column.error_key) if column.error_key else None
    if error is None or not isinstance(value, float) or math.isnan(value) or not math.isfinite(error):
        return fmt(value, column.digits, column.suffix)
    return f"{value:.{column.digits}f} ± {error:.{column.digits}f}{column.suffix}"


def _label(entry: Entry) -> str:
    star = " ★" if entry.selected else ""
    other = " †" if entry.kind == "other" else ""
    return f"{entry.name}{star}{other}"


def quality_table(entries: list[Entry], columns: list[Column]) -> str:
    shown = [c for c in columns if c.table == "quality"]
    rows = [[_label(e), fmt(e.bpw), fmt((e.size_bytes or 0) / 2**20, 2), *(cell(e.metrics, c) for c in shown)]
            for e in entries]
    return markdown_table(["Model", "BPW", "Size (MiB)", *(c.label for c in shown)], rows)


def task_columns(entries: list[Entry], columns: list[Column]) -> list[Column]:
    """The task benchmarks' columns some entry has a value of."""
    return [c for c in columns if c.table == "tasks" and any(c.key in e.metrics for e in entries)]


def tasks_table(entries: list[Entry], columns: list[Column], substitutes: dict[str, str]) -> str | None:
    present = task_columns(entries, columns)
    if not present:
        return None
    rows = []
    for e in entries:
        known = [e.metrics[c.key] for c in present if e.metrics.get(c.key) is not None]
        rows.append([_label(e), *(cell(e.metrics, c) for c in present), fmt(sum(known) / len(known), 2) if known else "–"])
    header = ["Model", *(f"{c.label}{' (substitute)' if c.key in substitutes else ''}" for c in present), "Average"]
    return markdown_table(header, rows)


def bench_table(entries: list[Entry]) -> str | None:
    tests = sorted({t for e in entries for t in e.bench}, key=lambda t: (len(t), t))
    if not tests:
        return None
    rows = [[_label(e), *(fmt(e.bench.get(t), 2) for t in tests)] for e in entries]
    return markdown_table(["Model", *(f"{t} (t/s)" for t in tests)], rows)


def _by_layer(types: dict[str, str]) -> tuple[dict[int, dict[str, str]], list[str], list[str]]:
    """(layer -> role -> type, roles in first-seen order, "`name` TYPE" of the tensors outside layers).

    F32 tensors (norms, routers) are left out: no quantization ever touches them.
    """
    layers: dict[int, dict[str, str]] = {}
    roles: list[str] = []
    others = []
    for name, t in types.items():
        if t == "F32":
            continue
        layer, role = role_of(name)
        if layer is None:
            others.append(f"`{role}` {t}")
            continue
        layers.setdefault(layer, {})[role] = t
        if role not in roles:
            roles.append(role)
    return layers, roles, others


def type_grid(types: dict[str, str]) -> str:
    """The type of every tensor as a layer-by-role table (non-layer tensors on top)."""
    layers, roles, others = _by_layer(types)
    head = "Other tensors: " + ", ".join(others) + "\n\n" if others else ""
    rows = [[str(i), *(layers[i].get(r, "") for r in roles)] for i in sorted(layers)]
    return head + markdown_table(["layer", *roles], rows)


def markdown(report: Report) -> str:
    entries = report.entries
    parts = [f"# tbpw report: {report.name}", ""]
    if report.description:
        parts += [report.description, ""]
    parts += [f"Model: {report.model}", f"llama.cpp: build {report.build}", ""]
    for note in report.notes:
        parts += [f"> **Note:** {note}", ""]
    parts += ["## Quality against the baseline", "",
              f"Evaluation text: {report.evaluation_text}. ★ marks the best quant of each target "
              f"(by {', '.join(report.select_by)}).", "", quality_table(entries, report.columns), ""]
    noted = [e for e in entries if e.note]
    if noted:
        parts += [f"- {e.name}{' †' if e.kind == 'other' else ''}: {e.note}" for e in noted] + [""]
    tasks = tasks_table(entries, report.columns, report.substitutes)
    if tasks:
        parts += ["## Benchmarks (accuracy, %)", ""]
        for key, what in sorted(report.substitutes.items()):
            parts += [f"- {key}: {what}"]
        parts += ["", tasks, ""]
    bench = bench_table(entries)
    if bench:
        parts += ["## Speed (llama-bench)", "", bench, ""]
    chosen = [e for e in report.selected() if e.types]
    if chosen:
        parts += ["## Type maps of the chosen quants", ""]
        for e in chosen:
            parts += [f"### {e.name} ({fmt(e.bpw)} bpw)", "", type_grid(e.types), ""]
    if report.plots:
        parts += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in report.plots] + [""]
    return "\n".join(parts)


def _pyplot():
    """matplotlib's pyplot on a file-only backend, or None when the `plots` extra is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, out: Path) -> None:
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_quality(entries: list[Entry], column: Column, out: Path) -> bool:
    """`column` (the first the selection ranks by) against bpw, one series per allocator, stock types as points."""
    plt = _pyplot()
    if plt is None:
        return False
    series: dict[str, list[tuple[float, float]]] = {}
    for e in entries:
        value = e.metrics.get(column.key)
        if value is None or e.bpw is None or e.kind == "base":
            continue
        series.setdefault(e.allocator or ("others †" if e.kind == "other" else "stock"), []).append((e.bpw, value))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(series.items()):
        points.sort()
        style = "s" if label == "stock" else "^" if label == "others †" else "o-"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
    for e in entries:
        if e.kind in ("stock", "other") and e.metrics.get(column.key) is not None and e.bpw is not None:
            name = e.name.removeprefix("stock-").removeprefix("other-") + (" †" if e.kind == "other" else "")
            ax.annotate(name, (e.bpw, e.metrics[column.key]), fontsize=7)
    if column.lower_is_better and all(v > 0 for points in series.values() for _, v in points):
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel(column.label + (" (log)" if ax.get_yscale() == "log" else ""))
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save(plt, fig, out)
    return True


def plot_type_grid(entry: Entry, out: Path) -> bool:
    import numpy as np

    plt = _pyplot()
    layers, roles, _ = _by_layer(entry.types)
    if plt is None or not layers:
        return False
    ids = sorted(layers)
    grid = np.full((len(ids), len(roles)), np.nan)
    for i, layer in enumerate(ids):
        for j, role in enumerate(roles):
            if role in layers[layer]:
                grid[i, j] = nominal_bpw(layers[layer][role])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(roles), 1.0 + 0.28 * len(ids)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    for i, layer in enumerate(ids):
        for j, role in enumerate(roles):
            if role in layers[layer]:
                ax.text(j, i, layers[layer][role], ha="center", va="center", fontsize=6, color="white")
    ax.set_xticks(range(len(roles)), roles, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(ids)), [str(i) for i in ids], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(f"{entry.name}: nominal bpw per tensor", fontsize=9)
    fig.colorbar(image, ax=ax, label="bpw")
    _save(plt, fig, out)
    return True


def write_report(report: Report, folder: Path) -> Path:
    """Write report.md, report.json and the plots into `folder` (the plots' names into `report.plots`); returns the
    Markdown's path."""
    folder.mkdir(parents=True, exist_ok=True)
    plots = []
    columns = {c.key: c for c in report.columns}
    primary = columns.get(next(iter(report.select_by), ""))
    if primary is not None and plot_quality(report.entries, primary, folder / f"{primary.key}-vs-bpw.png"):
        plots.append(f"{primary.key}-vs-bpw.png")
    for e in report.selected():
        if e.types and plot_type_grid(e, folder / f"types-{e.name}.png"):
            plots.append(f"types-{e.name}.png")
    report.plots = plots
    write_json(folder / "report.json", report.to_json())
    write_text(folder / "report.md", markdown(report))
    return folder / "report.md"
