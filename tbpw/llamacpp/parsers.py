"""Pure parsers of llama.cpp tool output: captured text in, typed results out.

Each parser takes the text a tool printed (stdout and stderr joined: ``ToolRun.output``) and returns a
frozen dataclass. When the expected lines are missing it raises ``ParseError`` saying what was missing
and the likely cause; ``parse_run`` adds the tool's log path to that message.

The line formats are those of llama.cpp b11312 (see ``tools/perplexity/perplexity.cpp``,
``src/llama-quant.cpp``, ``tools/llama-bench/llama-bench.cpp``); the target-bpw fork prints the same lines.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from tbpw.errors import TbpwError

if TYPE_CHECKING:
    from tbpw.llamacpp.tools import ToolRun

# A C printf number, including what %f prints for non-finite values ("nan", "-nan", "inf").
NUM = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"


class ParseError(TbpwError):
    """The output lacks the lines a parser needs (the run failed early, or the tool changed its format)."""


def _num(text: str) -> float:
    return float(text)


@dataclass(frozen=True)
class Estimate:
    """A value with its uncertainty, as llama.cpp prints `x ± y` or `x +/- y`."""

    value: float
    error: float


def flatten(result: Any, prefix: str = "") -> dict[str, float]:
    """A result as flat `name: number` pairs (for reports): Estimates give `name` and `name_error`."""
    out: dict[str, float] = {}
    if isinstance(result, Estimate):
        out[prefix] = result.value
        out[f"{prefix}_error"] = result.error
    elif is_dataclass(result):
        for f in fields(result):
            value = getattr(result, f.name)
            # Percentile maps read better without their field name: kld_p99.9 rather than kld_percentiles_p99.9.
            name = prefix if isinstance(value, Mapping) and prefix else f"{prefix}_{f.name}" if prefix else f.name
            out.update(flatten(value, name))
    elif isinstance(result, Mapping):
        for key, value in result.items():
            label = f"{key:g}" if isinstance(key, float) else str(key)
            out.update(flatten(value, f"{prefix}_p{label}" if isinstance(key, float) else f"{prefix}_{label}"))
    elif isinstance(result, (int, float)) and not isinstance(result, bool):
        out[prefix] = float(result)
    return out


# ---------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class PerplexityResult:
    ppl: Estimate
    chunk_ppls: tuple[float, ...]  # running estimate after each chunk, as printed "[1]x,[2]y,..."
    n_chunks: int | None  # from "calculating perplexity over N chunks"
    n_ctx: int | None


_FINAL_PPL = re.compile(rf"Final estimate: PPL = ({NUM}) \+/- ({NUM})")
_CHUNK_PPL = re.compile(rf"\[(\d+)\]({NUM}),")
_OVER_CHUNKS = re.compile(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+)")


def parse_perplexity(text: str) -> PerplexityResult:
    """llama-perplexity (or llama-imatrix) without an evaluation mode: `Final estimate: PPL = x +/- y`."""
    finals = _FINAL_PPL.findall(text)
    if not finals:
        raise ParseError("llama-perplexity printed no `Final estimate: PPL` line: the run ended early or the text "
                         "is shorter than two contexts (give more text or a smaller -c)")
    value, error = finals[-1]
    chunks = tuple(_num(v) for _, v in _CHUNK_PPL.findall(text))
    over = _OVER_CHUNKS.search(text)
    return PerplexityResult(ppl=Estimate(_num(value), _num(error)), chunk_ppls=chunks,
                            n_chunks=int(over.group(1)) if over else None,
                            n_ctx=int(over.group(2)) if over else None)


# ---------------------------------------------------------------- KL divergence


@dataclass(frozen=True)
class Distribution:
    """A per-token statistic summarised as llama.cpp prints it: mean ± error, extremes, median, percentiles."""

    mean: Estimate
    maximum: float
    median: float
    minimum: float
    percentiles: Mapping[float, float]  # e.g. {99.9: ..., 99.0: ..., 0.1: ...}

    def percentile(self, p: float) -> float:
        if p == 50.0:
            return self.median
        if p == 100.0:
            return self.maximum
        if p == 0.0:
            return self.minimum
        if p not in self.percentiles:
            raise KeyError(f"percentile {p} was not printed; printed: {sorted(self.percentiles)}")
        return self.percentiles[p]


@dataclass(frozen=True)
class KldResult:
    """The three summary blocks of `llama-perplexity --kl-divergence`. Δp values are in percent."""

    ppl_q: Estimate
    ppl_base: Estimate
    ln_ppl_correlation_pct: float  # Cor(ln(PPL(Q)), ln(PPL(base))) in percent
    ln_ppl_ratio: Estimate  # Mean ln(PPL(Q)/PPL(base))
    ppl_ratio: Estimate  # Mean PPL(Q)/PPL(base)
    ppl_difference: Estimate  # Mean PPL(Q)-PPL(base)
    kld: Distribution
    delta_p_pct: Distribution
    rms_delta_p_pct: Estimate
    same_top_p_pct: Estimate


_BLOCK_HEADER = re.compile(r"^====== (.+?) ======\s*$")
_STAT_LINE = re.compile(rf"^\s*(.+?)\s*:\s*({NUM})\s*(?:%\s*)?(?:±\s*({NUM})\s*%?)?\s*$")
_PERCENTILE_LABEL = re.compile(r"^(\d+(?:\.\d+)?)%\s+(\S+)$")

KLD_BLOCKS = ("Perplexity statistics", "KL divergence statistics", "Token probability statistics")


def _blocks(text: str) -> dict[str, dict[str, tuple[float, float | None]]]:
    """`====== Title ======` blocks as {title: {label: (value, error or None)}}; label whitespace collapsed."""
    blocks: dict[str, dict[str, tuple[float, float | None]]] = {}
    current: dict[str, tuple[float, float | None]] | None = None
    for line in text.splitlines():
        if header := _BLOCK_HEADER.match(line):
            current = blocks.setdefault(header.group(1).strip(), {})
            continue
        if current is None:
            continue
        if not line.strip():
            current = None
            continue
        if m := _STAT_LINE.match(line):
            label = " ".join(m.group(1).split())
            current[label] = (_num(m.group(2)), _num(m.group(3)) if m.group(3) is not None else None)
    return blocks


def _distribution(block: dict[str, tuple[float, float | None]], symbol: str, where: str) -> Distribution:
    def value(label: str) -> tuple[float, float | None]:
        if label not in block:
            raise ParseError(f"the {where} block has no `{label}` line: the output is cut short or the format changed")
        return block[label]

    mean, mean_err = value(f"Mean {symbol}")
    percentiles = {}
    for label, (v, _) in block.items():
        if (m := _PERCENTILE_LABEL.match(label)) and m.group(2) == symbol:
            percentiles[float(m.group(1))] = v
    if not percentiles:
        raise ParseError(f"the {where} block has no percentile lines for {symbol}")
    return Distribution(mean=Estimate(mean, mean_err if mean_err is not None else math.nan),
                        maximum=value(f"Maximum {symbol}")[0], median=value(f"Median {symbol}")[0],
                        minimum=value(f"Minimum {symbol}")[0], percentiles=dict(sorted(percentiles.items(), reverse=True)))


def parse_kl_divergence(text: str) -> KldResult:
    """The `Perplexity`, `KL divergence` and `Token probability` statistics blocks of a KLD run."""
    blocks = _blocks(text)
    missing = [b for b in KLD_BLOCKS if b not in blocks]
    if missing:
        raise ParseError(f"llama-perplexity printed no `{missing[0]}` block: a KL-divergence run needs at least 100 "
                         "scored tokens and the same -c as the saved base logits")
    ppl, kld, prob = (blocks[b] for b in KLD_BLOCKS)

    def est(block: dict, label: str, where: str) -> Estimate:
        if label not in block or block[label][1] is None:
            raise ParseError(f"the {where} block has no `{label} : x ± y` line: the output is cut short or the format changed")
        value, error = block[label]
        return Estimate(value, error)

    cor_label = "Cor(ln(PPL(Q)), ln(PPL(base)))"
    if cor_label not in ppl:
        raise ParseError(f"the Perplexity statistics block has no `{cor_label}` line")
    return KldResult(
        ppl_q=est(ppl, "Mean PPL(Q)", "Perplexity statistics"),
        ppl_base=est(ppl, "Mean PPL(base)", "Perplexity statistics"),
        ln_ppl_correlation_pct=ppl[cor_label][0],
        ln_ppl_ratio=est(ppl, "Mean ln(PPL(Q)/PPL(base))", "Perplexity statistics"),
        ppl_ratio=est(ppl, "Mean PPL(Q)/PPL(base)", "Perplexity statistics"),
        ppl_difference=est(ppl, "Mean PPL(Q)-PPL(base)", "Perplexity statistics"),
        kld=_distribution(kld, "KLD", "KL divergence statistics"),
        delta_p_pct=_distribution(prob, "Δp", "Token probability statistics"),
        rms_delta_p_pct=est(prob, "RMS Δp", "Token probability statistics"),
        same_top_p_pct=est(prob, "Same top p", "Token probability statistics"),
    )


_KLD_CHUNK_ROW = re.compile(rf"^\s*(\d+)\s+{NUM}\s*±\s*{NUM}\s+{NUM}\s*±\s*{NUM}\s+({NUM})\s*±\s*{NUM}\s", re.M)
KLD_CHUNK_DECIMALS = 5  # the running KLD mean of each chunk row is printed with %10.5lf


def parse_kld_chunks(text: str) -> list[float]:
    """The mean KL divergence of each chunk of a KLD run, from the running means its chunk rows print
    (`chunk  PPL  ln(PPL(Q)/PPL(base))  KL Divergence ...`): chunk i's mean is i*M_i - (i-1)*M_(i-1).

    Every chunk scores the same number of tokens, so this is exact up to the printed precision: each value
    is within (2i - 1) * 0.5e-5 of the true one (KLD_CHUNK_DECIMALS)."""
    running = [(int(i), _num(m)) for i, m in _KLD_CHUNK_ROW.findall(text)]
    if not running or [i for i, _ in running] != list(range(1, len(running) + 1)):
        raise ParseError("llama-perplexity printed no numbered chunk rows (`   1    PPL ± e  ...  KLD ± e ...`): "
                         "the run failed before its first chunk, or the format changed")
    out, previous = [], 0.0
    for i, mean in running:
        out.append(i * mean - (i - 1) * previous)
        previous = mean
    return out


# ---------------------------------------------------------------- task scores


@dataclass(frozen=True)
class HellaswagResult:
    tasks: int
    acc_norm_pct: float
    ci_low_pct: float  # Wilson 95% interval
    ci_high_pct: float


_HELLASWAG_ROW = re.compile(rf"^(\d+)\t({NUM})%\t\[({NUM})%, ({NUM})%\]\s*$", re.M)


def parse_hellaswag(text: str) -> HellaswagResult:
    """`--hellaswag`: the last row of the `task acc_norm 95% confidence interval` table is the score."""
    rows = _HELLASWAG_ROW.findall(text)
    if not rows:
        raise ParseError("llama-perplexity printed no HellaSwag rows (`N<TAB>acc%<TAB>[lo%, hi%]`): "
                         "check the task file (6 lines per task) and --hellaswag-tasks")
    n, acc, lo, hi = rows[-1]
    return HellaswagResult(int(n), _num(acc), _num(lo), _num(hi))


@dataclass(frozen=True)
class TaskScore:
    """A WinoGrande or multiple-choice accuracy. `error_pct` is None when the tool printed no final line
    (it prints one only from 100 tasks on) and the score comes from the last table row."""

    tasks: int
    accuracy_pct: float
    error_pct: float | None
    final: bool  # True when read from the tool's own final line
    random_chance: Estimate | None = None  # multiple choice only


_WINO_FINAL = re.compile(rf"Final Winogrande score\((\d+) tasks\): ({NUM}) \+/- ({NUM})")
_WINO_ROW = re.compile(rf"^(\d+)\t({NUM})\t\s*{NUM}\s+{NUM}\s+[12]\s+[12]\s*$", re.M)


def parse_winogrande(text: str) -> TaskScore:
    """`--winogrande`: `Final Winogrande score(N tasks): x +/- y`, else the last row's running accuracy."""
    if finals := _WINO_FINAL.findall(text):
        n, acc, err = finals[-1]
        return TaskScore(int(n), _num(acc), _num(err), final=True)
    rows = _WINO_ROW.findall(text)
    if not rows:
        raise ParseError("llama-perplexity printed no WinoGrande score: check the CSV "
                         "(index,sentence,option1,option2,answer with `_` in the sentence)")
    n, acc = rows[-1]
    return TaskScore(int(n), _num(acc), None, final=False)


_MC_FINAL = re.compile(rf"Final result: ({NUM}) \+/- ({NUM})")
_MC_RANDOM = re.compile(rf"Random chance: ({NUM}) \+/- ({NUM})")
_MC_ROW = re.compile(rf"^(\d+)\t({NUM})\s*$", re.M)


def parse_multiple_choice(text: str) -> TaskScore:
    """`--multiple-choice`: `Final result: x +/- y` and `Random chance: x +/- y`, else the last row."""
    rows = _MC_ROW.findall(text)
    finals = _MC_FINAL.findall(text)
    if finals:
        acc, err = finals[-1]
        chance = _MC_RANDOM.findall(text)
        return TaskScore(int(rows[-1][0]) if rows else 0, _num(acc), _num(err), final=True,
                         random_chance=Estimate(*map(_num, chance[-1])) if chance else None)
    if not rows:
        raise ParseError("llama-perplexity printed no multiple-choice score: check the -bf task file")
    n, acc = rows[-1]
    return TaskScore(int(n), _num(acc), None, final=False)


# ---------------------------------------------------------------- llama-bench


@dataclass(frozen=True)
class BenchTest:
    """One llama-bench test (one row of its JSON)."""

    build_commit: str
    build_number: int
    backends: str
    model_type: str
    model_size: int  # bytes
    model_n_params: int
    n_threads: int
    n_gpu_layers: int
    n_prompt: int
    n_gen: int
    n_depth: int
    avg_ts: float  # tokens per second
    stddev_ts: float
    samples_ts: tuple[float, ...]
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def name(self) -> str:
        """llama-bench's own test label: pp512, tg128, pp512+tg128 (with @d<depth> when deep)."""
        parts = []
        if self.n_prompt:
            parts.append(f"pp{self.n_prompt}")
        if self.n_gen:
            parts.append(f"tg{self.n_gen}")
        label = "+".join(parts) or "none"
        return f"{label} @ d{self.n_depth}" if self.n_depth else label


@dataclass(frozen=True)
class BenchResult:
    tests: tuple[BenchTest, ...]

    def get(self, name: str) -> BenchTest:
        for test in self.tests:
            if test.name == name:
                return test
        raise KeyError(f"no llama-bench test {name!r}; tests: {', '.join(t.name for t in self.tests)}")


def parse_bench_json(text: str) -> BenchResult:
    """`llama-bench -o json` (one array) or `-o jsonl` (one object per line); log lines around it are ignored."""
    rows = _json_rows(text)
    if not rows:
        raise ParseError("llama-bench printed no JSON results: run it with `-o json` and check that the model loads")
    tests = []
    for row in rows:
        try:
            tests.append(BenchTest(
                build_commit=str(row["build_commit"]), build_number=int(row["build_number"]),
                backends=str(row.get("backends", "")), model_type=str(row["model_type"]),
                model_size=int(row["model_size"]), model_n_params=int(row["model_n_params"]),
                n_threads=int(row["n_threads"]), n_gpu_layers=int(row["n_gpu_layers"]),
                n_prompt=int(row["n_prompt"]), n_gen=int(row["n_gen"]), n_depth=int(row.get("n_depth", 0)),
                avg_ts=float(row["avg_ts"]), stddev_ts=float(row["stddev_ts"]),
                samples_ts=tuple(float(v) for v in row.get("samples_ts", ())), raw=row))
        except KeyError as exc:
            raise ParseError(f"a llama-bench JSON row has no {exc.args[0]!r} field: this llama-bench is too old or too new") from exc
    return BenchResult(tuple(tests))


def _json_rows(text: str) -> list[dict]:
    decoder = json.JSONDecoder()
    start = text.find("[")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("[", start + 1)
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return value
        start = text.find("[", start + 1)
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and "avg_ts" in value:
                rows.append(value)
    return rows


# ---------------------------------------------------------------- llama-quantize


@dataclass(frozen=True)
class QuantizedTensor:
    """One `[ i/ n] name - [shape], type = T, ...` line of llama-quantize."""

    index: int
    name: str
    shape: tuple[int, ...]  # ne0 first, trailing 1s dropped
    source_type: str
    type: str  # the type written (the source type when the tensor was copied)
    size_mib: float  # before
    new_size_mib: float  # after (MiB with 2-3 decimals: compute exact sizes from the output file)

    @property
    def converted(self) -> bool:
        return self.type != self.source_type


@dataclass(frozen=True)
class QuantizeResult:
    target: str | None  # the base type, from "quantizing 'in' to 'out' as TYPE"
    model_size_mib: float
    model_bpw: float
    quant_size_mib: float
    quant_bpw: float  # 2 decimals in stock builds: compute exact bpw from the output GGUF
    tensors: tuple[QuantizedTensor, ...]
    overrides: Mapping[str, str]  # tensor -> type from "applying manual override" lines
    fallbacks: Mapping[str, str]  # tensor -> type llama.cpp fell back to (row size not divisible by the block)
    imatrix_entries: int | None
    quantize_ms: float | None
    dry_run: bool

    def types(self) -> dict[str, str]:
        return {t.name: t.type for t in self.tensors}


_QUANT_AS = re.compile(r"(?:quantizing '.*?' to '.*?'|calculating quantization size for '.*?') as (\S+)")
_SIZE_LINE = re.compile(rf"(model|quant) size\s*=\s*({NUM}) MiB \(\s*({NUM}) BPW\)")
_TENSOR_START = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+- \[([\d,\s]+)\], type =\s*(\S+?),", re.M)
_CONVERTING = re.compile(r"converting to\s+(\S+?)\s")
_SIZES = re.compile(rf"size =\s*({NUM}) MiB(?: ->\s*({NUM}) MiB(?: \((\S+)\))?)?")
_OVERRIDE = re.compile(r"(\S+)\s+- applying manual override: (\S+) -> (\S+)")
_FALLBACK = re.compile(r"warning: (\S+)\s+- ncols .*?-> falling back to\s+(\S+)")
_IMATRIX_ENTRIES = re.compile(r"have importance matrix data with (\d+) entries|loaded (\d+) importance matrix entries")
_QUANT_TIME = re.compile(rf"quantize time =\s*({NUM}) ms")


def parse_quantize(text: str) -> QuantizeResult:
    """llama-quantize's per-tensor lines and its `model size` / `quant size` summary."""
    sizes = {kind: (_num(mib), _num(bpw)) for kind, mib, bpw in _SIZE_LINE.findall(text)}
    if "quant" not in sizes or "model" not in sizes:
        raise ParseError("llama-quantize printed no `quant size = ... MiB` summary: the run stopped before the end")
    tensors = []
    dry_run = "dry run completed" in text
    starts = list(_TENSOR_START.finditer(text))
    for i, m in enumerate(starts):
        # Other log lines (imatrix loading, warnings) can land inside a tensor's line: read up to the next tensor.
        segment = text[m.end(): starts[i + 1].start() if i + 1 < len(starts) else len(text)]
        source = m.group(5)
        conv = _CONVERTING.search(segment)
        size = _SIZES.search(segment)
        if size is None:
            raise ParseError(f"llama-quantize's line for {m.group(3)} has no `size =` part: the run stopped early")
        new_type = conv.group(1) if conv else (size.group(3) or source)
        dry_run = dry_run or size.group(3) is not None  # only --dry-run names the type after the sizes
        before = _num(size.group(1))
        tensors.append(QuantizedTensor(
            index=int(m.group(1)), name=m.group(3), shape=_shape(m.group(4)), source_type=source, type=new_type,
            size_mib=before, new_size_mib=_num(size.group(2)) if size.group(2) else before))
    target = _QUANT_AS.search(text)
    entries = _IMATRIX_ENTRIES.search(text)
    qtime = _QUANT_TIME.search(text)
    return QuantizeResult(
        target=target.group(1) if target else None,
        model_size_mib=sizes["model"][0], model_bpw=sizes["model"][1],
        quant_size_mib=sizes["quant"][0], quant_bpw=sizes["quant"][1], tensors=tuple(tensors),
        overrides={n: t for n, _, t in _OVERRIDE.findall(text)}, fallbacks=dict(_FALLBACK.findall(text)),
        imatrix_entries=int(entries.group(1) or entries.group(2)) if entries else None,
        quantize_ms=_num(qtime.group(1)) if qtime else None,
        dry_run=dry_run)


def _shape(text: str) -> tuple[int, ...]:
    dims = [int(d) for d in text.replace(" ", "").split(",") if d]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


# ---------------------------------------------------------------- llama-imatrix


@dataclass(frozen=True)
class ImatrixResult:
    n_chunks: int  # chunks the tool set out to process
    n_ctx: int
    chunk_ppls: tuple[float, ...]
    ppl: Estimate | None  # printed only when the run computed perplexity (the default)
    partial: Mapping[str, float]  # tensor -> percent of columns with data, for entries stored with gaps
    skipped: tuple[str, ...]  # entries with no data at all (not stored)


_IMX_OVER = re.compile(r"compute_imatrix: computing over (\d+) chunks, n_ctx=(\d+)")
_IMX_PARTIAL = re.compile(rf"entry '\s*(\S+)' has partial data \(({NUM})%\)")
_IMX_SKIPPED = re.compile(r"entry '\s*(\S+)' has no data - skipping")


def parse_imatrix(text: str) -> ImatrixResult:
    """llama-imatrix's run summary (statistics come from the output file, see the reference notes)."""
    over = _IMX_OVER.search(text)
    if over is None:
        raise ParseError("llama-imatrix printed no `computing over N chunks` line: the model or the text failed to load "
                         "(the text must hold at least two contexts of tokens)")
    final = _FINAL_PPL.findall(text)
    return ImatrixResult(
        n_chunks=int(over.group(1)), n_ctx=int(over.group(2)),
        chunk_ppls=tuple(_num(v) for _, v in _CHUNK_PPL.findall(text)),
        ppl=Estimate(_num(final[-1][0]), _num(final[-1][1])) if final else None,
        partial={n: _num(p) for n, p in _IMX_PARTIAL.findall(text)},
        skipped=tuple(dict.fromkeys(_IMX_SKIPPED.findall(text))))


# ---------------------------------------------------------------- version


@dataclass(frozen=True)
class VersionInfo:
    version: str
    build_number: int
    commit: str
    compiler: str | None
    target: str | None


_VERSION = re.compile(r"version: (\S+) \(build (\d+), commit (\S+)\)")
_VERSION_OLD = re.compile(r"version: (\d+) \((\S+)\)")
_BUILT_WITH = re.compile(r"built with (.+?) for (.+?)\s*$", re.M)


def parse_version(text: str) -> VersionInfo:
    """`--version` of any tool: `version: 0.2.0-dev (build 11312, commit 0c1e570)` / `built with CC for TARGET`
    (older trees print `version: 11312 (0c1e570)`)."""
    built = _BUILT_WITH.search(text)
    compiler, target = (built.group(1), built.group(2)) if built else (None, None)
    if m := _VERSION.search(text):
        return VersionInfo(m.group(1), int(m.group(2)), m.group(3), compiler, target)
    if m := _VERSION_OLD.search(text):
        return VersionInfo(m.group(1), int(m.group(1)), m.group(2), compiler, target)
    raise ParseError("the tool printed no `version:` line: it is not a llama.cpp tool or it failed to start")


# ---------------------------------------------------------------- helper

R = TypeVar("R")


def parse_run(parser: Callable[[str], R], run: ToolRun) -> R:
    """Apply `parser` to a tool run's output; a parse failure names the run's log."""
    try:
        return parser(run.output)
    except ParseError as exc:
        raise ParseError(f"{exc} (log: {run.log_path})") from exc
