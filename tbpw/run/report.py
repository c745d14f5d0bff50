"""The run's report: model-card tables in Markdown, every number in JSON, and PNG plots.

Pure formatting of the entries the pipeline collected (each entry's numbers are the parsed tool
outputs); only `write_report` touches the disk.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tbpw.files.atomic import atomic_path, write_json, write_text
from tbpw.model.ggml_types import nominal_bpw
from tbpw.model.inventory import role_of
from tbpw.plugin.base import Column


def as_columns(columns: list[Column] | list[dict]) -> list[Column]:
    """Columns as the evaluators declared them (report.json keeps them as dicts)."""
    return [c if isinstance(c, Column) else Column(**c) for c in columns]


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


def _label(entry: dict) -> str:
    star = " ★" if entry.get("selected") else ""
    other = " †" if entry.get("kind") == "other" else ""
    return f"{entry['name']}{star}{other}"


def quality_table(entries: list[dict], columns: list[Column] | list[dict]) -> str:
    shown = [c for c in as_columns(columns) if c.table == "quality"]
    rows = []
    for e in entries:
        m = e.get("metrics", {})
        rows.append([_label(e), fmt(e.get("bpw")), fmt(e.get("size_bytes", 0) / 2**20, 2),
                     *(cell(m, c) for c in shown)])
    return markdown_table(["Model", "BPW", "Size (MiB)", *(c.label for c in shown)], rows)


def tasks_table(entries: list[dict], columns: list[Column] | list[dict], substitutes: dict[str, str]) -> str | None:
    present = [c for c in as_columns(columns) if c.table == "tasks"
               and any(c.key in e.get("metrics", {}) for e in entries)]
    if not present:
        return None
    rows = []
    for e in entries:
        m = e.get("metrics", {})
        known = [m[c.key] for c in present if m.get(c.key) is not None]
        rows.append([_label(e), *(cell(m, c) for c in present), fmt(sum(known) / len(known), 2) if known else "–"])
    header = ["Model", *(f"{c.label}{' (substitute)' if c.key in substitutes else ''}" for c in present), "Average"]
    return markdown_table(header, rows)


def bench_table(entries: list[dict]) -> str | None:
    tests = sorted({t for e in entries for t in e.get("bench", {})}, key=lambda t: (len(t), t))
    if not tests:
        return None
    rows = [[_label(e), *(fmt(e.get("bench", {}).get(t), 2) for t in tests)] for e in entries]
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


def markdown(run: dict) -> str:
    entries = run["entries"]
    parts = [f"# tbpw report: {run['name']}", ""]
    if run.get("description"):
        parts += [run["description"], ""]
    parts += [f"Model: {run['model']}", f"llama.cpp: build {run.get('build', '?')}", ""]
    for note in run.get("notes", []):
        parts += [f"> **Note:** {note}", ""]
    parts += ["## Quality against the baseline", "",
              f"Evaluation text: {run.get('evaluation_text', '?')}. ★ marks the best quant of each target "
              f"(by {', '.join(run.get('select_by', []))}).", "", quality_table(entries, run.get("columns", [])), ""]
    noted = [e for e in entries if e.get("note")]
    if noted:
        parts += [f"- {e['name']}{' †' if e.get('kind') == 'other' else ''}: {e['note']}" for e in noted] + [""]
    tasks = tasks_table(entries, run.get("columns", []), run.get("substitutes", {}))
    if tasks:
        parts += ["## Benchmarks (accuracy, %)", ""]
        for key, what in sorted(run.get("substitutes", {}).items()):
            parts += [f"- {key}: {what}"]
        parts += ["", tasks, ""]
    bench = bench_table(entries)
    if bench:
        parts += ["## Speed (llama-bench)", "", bench, ""]
    chosen = [e for e in entries if e.get("selected") and e.get("types")]
    if chosen:
        parts += ["## Type maps of the chosen quants", ""]
        for e in chosen:
            parts += [f"### {e['name']} ({fmt(e.get('bpw'))} bpw)", "", type_grid(e["types"]), ""]
    plots = run.get("plots", [])
    if plots:
        parts += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
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


def plot_quality(entries: list[dict], column: Column, out: Path) -> bool:
    """`column` (the first the selection ranks by) against bpw, one series per allocator, stock types as points."""
    plt = _pyplot()
    if plt is None:
        return False
    series: dict[str, list[tuple[float, float]]] = {}
    for e in entries:
        value = e.get("metrics", {}).get(column.key)
        if value is None or e.get("bpw") is None or e.get("kind") == "base":
            continue
        series.setdefault(e.get("allocator") or ("others †" if e.get("kind") == "other" else "stock"), []).append(
            (e["bpw"], value))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(series.items()):
        points.sort()
        style = "s" if label == "stock" else "^" if label == "others †" else "o-"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
    for e in entries:
        if e.get("kind") in ("stock", "other") and e.get("metrics", {}).get(column.key) is not None:
            name = e["name"].removeprefix("stock-").removeprefix("other-") + (" †" if e["kind"] == "other" else "")
            ax.annotate(name, (e["bpw"], e["metrics"][column.key]), fontsize=7)
    if column.lower_is_better and all(v > 0 for points in series.values() for _, v in points):
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel(column.label + (" (log)" if ax.get_yscale() == "log" else ""))
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save(plt, fig, out)
    return True


def plot_type_grid(entry: dict, out: Path) -> bool:
    import numpy as np

    plt = _pyplot()
    layers, roles, _ = _by_layer(entry.get("types", {}))
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
    ax.set_title(f"{entry['name']}: nominal bpw per tensor", fontsize=9)
    fig.colorbar(image, ax=ax, label="bpw")
    _save(plt, fig, out)
    return True


def write_report(run: dict, folder: Path) -> Path:
    """Write report.md, report.json and the plots into `folder`; returns the Markdown's path."""
    folder.mkdir(parents=True, exist_ok=True)
    plots = []
    columns = {c.key: c for c in as_columns(run.get("columns", []))}
    primary = columns.get(next(iter(run.get("select_by", [])), ""))
    if primary is not None and plot_quality(run["entries"], primary, folder / f"{primary.key}-vs-bpw.png"):
        plots.append(f"{primary.key}-vs-bpw.png")
    for e in run["entries"]:
        if e.get("selected") and e.get("types") and plot_type_grid(e, folder / f"types-{e['name']}.png"):
            plots.append(f"types-{e['name']}.png")
    run = {**run, "plots": plots}
    write_json(folder / "report.json", run)
    write_text(folder / "report.md", markdown(run))
    return folder / "report.md"
