"""The model card: `report/README.md` in the Hugging Face hub's format, with the kept quants beside it.

It opens with the hub's YAML front matter (`base_model` and `license` from the source where it says them,
`tags`, `pipeline_tag`), then four tables: the quants (made by tbpw, by stock llama-quantize, or by someone
else), their quality against the float model (perplexity, KL divergence, same-top-p, with the ± the tools
print), their task accuracies (± standard error), and llama-bench's rows as llama-bench prints them. Then the
method, written from the resolved recipe, and the caveats the run recorded. The best quant of each target is
hard-linked (or copied) beside the card as `<model>-<target>.gguf`, so the folder is ready for
`hf upload <repo> report/`.

`markdown` is pure formatting of the report the pipeline collected (report.json); `write_model_card` is the
only part that touches the disk.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from tbpw.files.atomic import atomic_path, write_text
from tbpw.llamacpp.bench import MARKDOWN_COLUMNS
from tbpw.model import gguf_layout
from tbpw.run.report import Entry, Report, cell, fmt, markdown_table, task_columns
from tbpw.stages.model import ModelSource

CARD = "README.md"
TAGS = ["gguf", "quantized", "llama.cpp", "imatrix", "tbpw"]
_HUB_URL = re.compile(r"^https?://huggingface\.co/([\w.-]+/[\w.-]+?)/?$")
_FLOAT_SUFFIX = re.compile(r"[.-](?:f16|bf16|f32)$", re.IGNORECASE)


# ------------------------------------------------------------------------------------------- the source


def _front_matter(readme: Path) -> dict:
    """The YAML front matter of a Hugging Face model card ({} when there is none)."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        data = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def source_facts(source: ModelSource, model: Path) -> dict[str, str]:
    """What the card says about the source model: its name for file names, its hub id and licence where known.

    The licence and a base model's hub id come from the converted GGUF (`general.license`,
    `general.base_model.0.repo_url`: llama.cpp's converter copies them from the source's model card), else from
    the model card in a Hugging Face folder given as the source."""
    fields = gguf_layout.read(model).fields
    folder = source.path if source.path is not None else None
    card = _front_matter(Path(folder) / "README.md") if folder is not None else {}
    facts: dict[str, str] = {}
    if source.hub:
        facts["base_model"] = source.hub
    else:
        for key in ("general.base_model.0.repo_url", "general.source.repo_url"):
            if isinstance(fields.get(key), str) and (m := _HUB_URL.match(fields[key])):
                facts["base_model"] = m.group(1)
                break
    license_ = fields.get("general.license") or card.get("license")
    if isinstance(license_, str) and license_:
        facts["license"] = license_
    if source.hub:
        name = source.hub.split("/")[-1]
    elif source.path is not None:
        name = Path(source.path).name
    else:
        name = _FLOAT_SUFFIX.sub("", Path(source.gguf or model).name.removesuffix(".gguf"))
    facts["name"] = re.sub(r"[^\w.-]+", "-", name).strip("-") or "model"
    return facts


# ------------------------------------------------------------------------------------------- the tables


def hub_file_name(report: Report, entry: Entry) -> str:
    """`<model>-<target>.gguf`, the name a kept quant gets beside the card."""
    return f"{report.source['name']}-{entry.target}.gguf"


def kept(report: Report) -> list[Entry]:
    """The quants the card ships: the best of each target."""
    return [e for e in report.selected() if e.kind == "tbpw"]


def _rows(report: Report) -> list[Entry]:
    """Every entry, the float model first, then the quants from the largest bpw down."""
    base = [e for e in report.entries if e.kind == "base"]
    quants = [e for e in report.entries if e.kind != "base"]
    return base + sorted(quants, key=lambda e: -(e.bpw or 0.0))


def _name(report: Report, entry: Entry) -> str:
    if entry.kind == "base":
        return "float model (baseline)"
    if entry in kept(report):
        return f"**{hub_file_name(report, entry)}**"
    if entry.kind == "stock":
        return f"llama-quantize {entry.name.removeprefix('stock-')}"
    if entry.kind == "other":
        return f"{entry.name.removeprefix('other-')} †"
    return entry.name


def _size(n: int | None) -> str:
    if not n:
        return "–"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def quants_table(report: Report) -> str:
    rows = []
    for e in _rows(report):
        if e.kind == "base":
            made = "the source model"
        elif e.kind == "tbpw":
            made = f"tbpw, {e.allocator}"
        elif e.kind == "stock":
            made = "stock llama-quantize with the same imatrix"
        else:
            made = (e.note or "someone else").removeprefix("not made by this run: ")
        file = hub_file_name(report, e) if e in kept(report) else ""
        rows.append([_name(report, e), made, e.target or "–", fmt(e.bpw), _size(e.size_bytes),
                     f"[{file}]({file})" if file else ""])
    return markdown_table(["Model", "Made by", "Target", "BPW", "Size", "File"], rows)


def quality_table(report: Report) -> str:
    shown = [c for c in report.columns if c.table == "quality"]
    rows = [[_name(report, e), fmt(e.bpw), fmt((e.size_bytes or 0) / 2**20, 2), *(cell(e.metrics, c) for c in shown)]
            for e in _rows(report)]
    return markdown_table(["Model", "BPW", "Size (MiB)", *(c.label for c in shown)], rows)


def tasks_table(report: Report) -> str | None:
    entries = _rows(report)
    shown = task_columns(entries, report.columns)
    if not shown:
        return None
    header = ["Model", *(f"{c.label}{' (substitute)' if c.key in report.substitutes else ''}" for c in shown)]
    return markdown_table(header, [[_name(report, e), *(cell(e.metrics, c) for c in shown)] for e in entries])


def bench_table(report: Report) -> str | None:
    rows = [(e, row) for e in _rows(report) for row in e.bench_rows]
    if not rows:
        return None
    present = {key for _, row in rows for key in row}
    columns = [c for c in MARKDOWN_COLUMNS if c in present]  # stage results keep their keys sorted
    return markdown_table(["Quant", *columns], [[_name(report, e), *(row.get(c, "") for c in columns)] for e, row in rows])


# ------------------------------------------------------------------------------------------- the text


def _options(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) if options else "defaults"


def _dataset(report: Report, role: str) -> str:
    data = report.datasets.get(role, {})
    sha = data.get("sha256", "")
    return f"{data.get('description') or role} (sha256 {sha[:16]}…)" if sha else (data.get("description") or role)


def method(report: Report) -> list[str]:
    r = report.recipe
    source = r.get("model", {})
    lines = []
    if source.get("hub") or source.get("path"):
        lines.append(f"- Source: {source.get('hub') or source.get('path')}, converted to {source.get('outtype', 'f16').upper()} "
                     "with llama.cpp's convert_hf_to_gguf.py.")
    elif source.get("gguf"):
        lines.append(f"- Source: the GGUF {Path(source['gguf']).name}.")
    else:
        lines.append(f"- Source: tbpw's demo model {source.get('asset')}.")
    imx = r.get("imatrix", {})
    collector = ("llama-imatrix (E[a²])" if imx.get("collector", "stock") == "stock"
                 else "tbpw's collector (E[a²] and E[a])")
    chunks = f"{imx['chunks']} chunks" if imx.get("chunks") else "every chunk"
    lines.append(f"- Importance matrix: {collector}, {chunks} of {imx.get('ctx', 512)} tokens of "
                 f"{_dataset(report, 'calibration')}{' (output tensor included)' if imx.get('process_output') else ''}.")
    measure = r.get("measure", {})
    metric = measure.get("metric") or {}
    lines.append(f"- Errors: metric `{metric.get('name', '?')}` ({_options(metric.get('options', {}))}) on sampled rows "
                 f"of every tensor for {'the types ' + ', '.join(measure['candidates']) if measure.get('candidates') else 'the default candidate types'}, "
                 "quantized with llama.cpp's own code (libggml).")
    allocators = "; ".join(f"`{a['name']}` ({_options(a.get('options', {}))})" for a in r.get("allocators") or [])
    targets = ", ".join(str(e.target) for e in kept(report)) or "none"
    lines.append(f"- Allocation: {allocators} for the targets {targets}; every type map was written by stock "
                 "llama-quantize with a complete --tensor-type-file and checked tensor by tensor.")
    constraints = {k: v for k, v in (r.get("constraints") or {}).items() if v}
    if constraints:
        lines.append(f"- Constraints: {constraints}.")
    if r.get("calibrate"):
        c = r["calibrate"]
        lines.append(f"- Calibration: the errors were rescaled to the KL divergence each {c['grouping']} costs when "
                     f"quantized alone to {', '.join(c['probes'])} ({c['chunks']} chunks of {c['ctx']} tokens of "
                     f"calibration text; strengths {', '.join(map(str, c['strengths']))}).")
    if r.get("choose"):
        c = r["choose"]
        lines.append(f"- Choice: per target, every plan was scored by KL divergence on calibration text ({c['chunks']} "
                     f"chunks of {c['ctx']} tokens) and the lowest kept"
                     + (f", then up to {c['refine_rounds']} rounds of measured type swaps." if c.get("refine_rounds") else "."))
    ev = r.get("evaluation", {})
    chunks = f"{ev['chunks']} chunks" if ev.get("chunks") else "every chunk"
    lines.append(f"- Evaluation: against the float model's logits on {_dataset(report, 'evaluation')}, {chunks} of "
                 f"{ev.get('ctx', 512)} tokens; tasks with {ev.get('task_ctx', 768)} tokens of context. Selection by "
                 f"{', '.join(report.select_by)}.")
    if report.overlap:
        o = report.overlap
        lines.append(f"- Held out: {o['sequences']:.1%} of the evaluation text's {o['words']}-word sequences and "
                     f"{o['lines']:.1%} of its long lines also occur in the calibration text"
                     + (" (more than tbpw considers held out: the numbers above are flattered)."
                        if max(o["sequences"], o["lines"]) > o["warn_share"] else "."))
    others = [role for role in report.datasets if role not in ("calibration", "evaluation")]
    for role in others:
        lines.append(f"- Task data `{role}`: {_dataset(report, role)}.")
    b = r.get("bench", {})
    if b.get("enabled", True) and any(e.bench_rows for e in report.entries):
        pg = f", pp{b['pg'][0]}+tg{b['pg'][1]}" if b.get("pg") else ""
        lines.append(f"- Speed: llama-bench pp{b.get('pp')}, tg{b.get('tg')}{pg}, {b.get('repetitions')} repetitions.")
    provenance = report.provenance
    lines.append(f"- Tools: llama.cpp build {report.build}, tbpw {report.tbpw_version}; "
                 f"recipe sha256 {provenance.get('recipe_sha256', '?')}. Each file records this in its metadata "
                 "(`tbpw.*` keys; `tbpw inspect FILE.gguf` prints them).")
    return lines


def caveats(report: Report) -> list[str]:
    items = [f"- {note}" for note in report.notes]
    for role, what in sorted(report.substitutes.items()):
        items.append(f"- {role}: {what}; not the real benchmark.")
    others = [e for e in report.entries if e.kind == "other"]
    if others:
        items.append("- † Someone else's file, not made by this run, evaluated and benched the same way: "
                     + "; ".join(f"{e.name.removeprefix('other-')}: {e.note.removeprefix('not made by this run: ')}"
                                 for e in others) + ".")
    if any(e.bench_rows for e in kept(report)):
        items.append("- llama-bench's `model` column names the file type each file records: a tbpw file is a mix of "
                     "types, labelled with the stock type whose usual size is the largest at or below its own (its "
                     "real types: report.md's type maps, `tbpw inspect FILE.gguf`).")
    ev = report.recipe.get("evaluation", {})
    if ev.get("chunks"):
        items.append(f"- The scores come from {ev['chunks']} chunks of evaluation text: differences within the ± "
                     "values are not significant.")
    source = report.source
    if "license" not in source:
        items.append("- The source names no licence: add `license:` to the front matter before publishing.")
    if "base_model" not in source:
        items.append("- The source names no Hugging Face repository: add `base_model:` to the front matter before "
                     "publishing.")
    for role, data in report.datasets.items():
        if data.get("attribution"):
            items.append(f"- Data attribution ({role}): {' '.join(data['attribution'].split())}")
    return items


def markdown(report: Report) -> str:
    source = report.source
    front: dict[str, Any] = {}
    if "base_model" in source:
        front["base_model"] = source["base_model"]
        front["base_model_relation"] = "quantized"
    if "license" in source:
        front["license"] = source["license"]
    front["pipeline_tag"] = "text-generation"
    front["tags"] = TAGS
    parts = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {source.get('name', report.name)} GGUF", ""]
    if report.description:
        parts += [report.description, ""]
    files = ", ".join(f"`{hub_file_name(report, e)}`" for e in kept(report))
    parts += [f"Quantizations made with tbpw on stock llama.cpp, each at an exact bits-per-weight target with the "
              f"least measured error: {files or 'none kept'}. Every number below was measured by the llama.cpp tools.",
              "", "## Quants", "", quants_table(report), "",
              "## Quality against the float model", "",
              f"On {_dataset(report, 'evaluation')}; ± is the uncertainty llama-perplexity prints.", "",
              quality_table(report), ""]
    tasks = tasks_table(report)
    if tasks:
        parts += ["## Task accuracy (%)", "", "± is the standard error.", "", tasks, ""]
    bench = bench_table(report)
    if bench:
        parts += ["## Speed (llama-bench)", "", bench, ""]
    parts += ["## Method", "", *method(report), "", "## Caveats", "", *(caveats(report) or ["- None recorded."]), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------- the folder


def _place(source: Path, target: Path) -> None:
    """`target` becomes `source`'s content: a hard link where the file system allows, else a copy."""
    if target.exists() and os.path.samefile(source, target):
        return
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(source, partial)
        os.replace(partial, target)
    except OSError:
        partial.unlink(missing_ok=True)
        with atomic_path(target) as tmp:  # a killed copy never leaves a model that looks complete
            shutil.copyfile(source, tmp)


def write_model_card(report: Report, folder: Path) -> Path:
    """Write `folder`/README.md (the run directory's report/) and put the kept quants beside it (files of earlier runs
    no longer kept go)."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {hub_file_name(report, e): folder.parent / str(e.path) for e in kept(report)}  # run-relative paths
    for stale in folder.glob("*.gguf"):
        if stale.name not in wanted:
            stale.unlink()
    for name, source in wanted.items():
        _place(source, folder / name)
    write_text(folder / CARD, markdown(report))
    return folder / CARD
