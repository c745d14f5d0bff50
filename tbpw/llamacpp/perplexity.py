"""llama-perplexity, every mode tbpw uses: the one place that writes its arguments.

- `base_logits` runs the float model once over a text and saves its logits (and the text's tokens);
- `kl_divergence` / `kld` score a quantized model against such a file. They take no text at all:
  llama-perplexity reads the tokens back from the logits file, so which text a score is on is decided by
  whoever made the logits file (tbpw's selection and calibration only ever make them from calibration text);
- `task` runs HellaSwag, WinoGrande or multiple choice on a task file.

Every run offloads the model to the GPU when the build has one (`offload.gpu_layers`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

from tbpw.errors import TbpwError
from tbpw.files import sealed
from tbpw.files.atomic import write_json
from tbpw.files.digest import content_sha256
from tbpw.llamacpp import parsers, progress, resources
from tbpw.llamacpp.build import BuildInfo, active_build
from tbpw.llamacpp.offload import offload_args
from tbpw.llamacpp.tools import ToolRun, run_tool

TaskMode = Literal["hellaswag", "winogrande", "multiple-choice"]
_TASK_PARSERS: dict[str, Callable[[str], parsers.HellaswagResult | parsers.TaskScore]] = {
    "hellaswag": parsers.parse_hellaswag, "winogrande": parsers.parse_winogrande,
    "multiple-choice": parsers.parse_multiple_choice}
_TASK_METERS = {"hellaswag": progress.HELLASWAG, "winogrande": progress.WINOGRANDE,
                "multiple-choice": progress.MULTIPLE_CHOICE}


@dataclass(frozen=True)
class BaseLogits:
    path: Path
    text: Path
    ctx: int
    chunks: int | None
    ppl: float
    ppl_error: float
    seconds: float


def _common(model: Path | str, ctx: int, chunks: int | None, threads: int | None, ngl: int | None,
            build: BuildInfo) -> list[str]:
    args = ["-m", str(model), "-c", str(ctx)]
    if chunks:
        args += ["--chunks", str(chunks)]
    if threads := resources.threads(threads):
        args += ["-t", str(threads)]
    return args + offload_args(build, ngl)


def base_logits(model: Path | str, text: Path | str, out: Path | str, *, ctx: int = 512, chunks: int | None = None,
                threads: int | None = None, ngl: int | None = None, log_path: Path | str | None = None,
                build: BuildInfo | None = None) -> BaseLogits:
    """Save the baseline's logits over `text` to `out`; reused when `out` is intact (its seal, tbpw.files.sealed),
    its log is there and the record of what made them (`out.source.json`: the model's and the text's content, ctx,
    chunks, the build) matches."""
    out, text = Path(out), Path(text)
    if not text.is_file():
        raise TbpwError(f"the text {text} does not exist: check the path")
    log_path = Path(log_path) if log_path else out.with_name(out.name + ".log")
    build = build or active_build()
    source = {"model": content_sha256(model), "text": content_sha256(text), "ctx": ctx, "chunks": chunks,
              "build": build.key, "ngl": ngl}
    record = out.with_name(out.name + ".source.json")
    if _recorded(record) == source and log_path.is_file() and sealed.trusted(out, "float logits"):
        try:
            result = parsers.parse_perplexity(log_path.read_text(encoding="utf-8", errors="replace"))
            return BaseLogits(out, text, ctx, chunks, result.ppl.value, result.ppl.error, 0.0)
        except parsers.ParseError:
            pass  # a damaged log: make the logits again
    record.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    run = run_tool("llama-perplexity", [*_common(model, ctx, chunks, threads, ngl, build), "-f", str(text),
                                        "--kl-divergence-base", str(partial)], log_path=log_path, build=build,
                   meter=progress.PERPLEXITY.expecting(chunks))
    result = parsers.parse_run(parsers.parse_perplexity, run)
    partial.replace(out)
    sealed.write_seal(out)
    write_json(record, source)
    return BaseLogits(out, text, ctx, chunks, result.ppl.value, result.ppl.error, run.seconds)


def _recorded(record: Path) -> dict | None:
    try:
        return json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def calibration_base(model: Path | str, calibration_text: Path | str, work_dir: Path | str, *, ctx: int, chunks: int,
                     threads: int | None = None, ngl: int | None = None) -> BaseLogits:
    """The float model's logits on calibration chunks, kept in `work_dir` for every plan scored there."""
    work = Path(work_dir)
    return base_logits(model, calibration_text, work / "calibration-base.logits", ctx=ctx, chunks=chunks,
                       threads=threads, ngl=ngl, log_path=work / "calibration-base.log")


def base_window(base: BaseLogits, start: int, stop: int, out: Path | str) -> BaseLogits:
    """Chunks [start, stop) of saved base logits, as their own file (reused when it exists).

    llama-perplexity --kl-divergence scores every chunk of the logits file it is given (its --chunks has no
    effect there), so scoring fewer chunks, or later ones, needs a file of just those. Each chunk is scored on its
    own tokens against its own stored log-probabilities, so a chunk scores in a window as it does in the whole
    file. The format: `_logits_`, u32 n_ctx, i32 n_vocab, i32 n_chunk, i32 tokens[n_chunk * n_ctx], then per
    chunk (n_ctx - 1 - n_ctx / 2) x (2 * ((n_vocab + 1) / 2) + 4) u16 log-probabilities."""
    import struct

    from tbpw.files.atomic import atomic_path

    out = Path(out)
    with open(base.path, "rb") as src:
        head = src.read(20)
        if len(head) != 20 or head[:8] != b"_logits_":
            raise TbpwError(f"{base.path} is not a llama-perplexity logits file: make it again")
        n_ctx, n_vocab, n_chunk = struct.unpack_from("<Iii", head, 8)
        if not 0 <= start < stop <= n_chunk:
            raise TbpwError(f"{base.path} holds {n_chunk} chunks, chunks {start} to {stop} were asked for: save the "
                            "base logits with more chunks")
        if (start, stop) == (0, n_chunk):
            return base
        if not out.is_file():
            per_chunk = (n_ctx - 1 - n_ctx // 2) * (2 * ((n_vocab + 1) // 2) + 4) * 2
            with atomic_path(out) as tmp, open(tmp, "wb") as dst:
                dst.write(head[:16] + struct.pack("<i", stop - start))
                dst.write(src.read(4 * n_chunk * n_ctx)[4 * start * n_ctx:4 * stop * n_ctx])
                src.seek(per_chunk * start, 1)
                left = per_chunk * (stop - start)
                while left:
                    block = src.read(min(left, 16 << 20))
                    if not block:
                        raise TbpwError(f"{base.path} is cut short: save the base logits again")
                    dst.write(block)
                    left -= len(block)
    return BaseLogits(out, base.text, base.ctx, stop - start, base.ppl, base.ppl_error, 0.0)


def kl_divergence(model: Path | str, logits: Path | str, *, ctx: int, chunks: int | None = None,
                  threads: int | None = None, ngl: int | None = None, log_path: Path | str | None = None,
                  build: BuildInfo | None = None) -> tuple[parsers.KldResult, ToolRun]:
    """Every statistic of `model` against saved logits (made with the same `ctx` and `chunks`)."""
    build = build or active_build()
    args = [*_common(model, ctx, chunks, threads, ngl, build), "--kl-divergence-base", str(logits),
            "--kl-divergence"]
    run = run_tool("llama-perplexity", args, log_path=log_path, build=build, meter=progress.KL_DIVERGENCE.expecting(chunks))
    return parsers.parse_run(parsers.parse_kl_divergence, run), run


@dataclass(frozen=True)
class KldScore:
    kld_mean: float
    kld_p99: float
    same_top_p: float
    rho_ppl: float
    ppl: float
    seconds: float
    chunk_kld: tuple[float, ...] = ()  # the mean KLD of each chunk (parsers.parse_kld_chunks), when printed

    def finite(self) -> bool:
        """Whether its KL divergences are finite (a damaged logits file or a broken model gives inf or nan)."""
        return all(math.isfinite(v) for v in (self.kld_mean, self.kld_p99, *self.chunk_kld))

    def to_json(self) -> dict:
        return {"kld_mean": self.kld_mean, "kld_p99": self.kld_p99, "same_top_p": self.same_top_p,
                "rho_ppl": self.rho_ppl, "ppl": self.ppl, "seconds": round(self.seconds, 3),
                **({"chunk_kld": list(self.chunk_kld)} if self.chunk_kld else {})}

    @classmethod
    def joined(cls, parts: Sequence[KldScore]) -> KldScore:
        """The score on the chunks of `parts` together (windows of one text, each scored whole: every chunk holds
        as many tokens, so each part weighs by its chunk count). The means and same-top-p add up exactly and
        PPL through its logarithm; `kld_p99` is the largest part's, an upper bound of the joined 99th
        percentile (at most 1% of any part lies above it), and `rho_ppl` the parts' mean, an approximation."""
        if any(not p.chunk_kld for p in parts):
            raise TbpwError("joining scores needs each part's per-chunk KLD: score with a llama-perplexity that "
                            "prints its chunk rows")
        weights = [len(p.chunk_kld) for p in parts]
        total = sum(weights)

        def mean(values: Iterable[float]) -> float:
            return sum(w * v for w, v in zip(weights, values)) / total

        return cls(kld_mean=mean(p.kld_mean for p in parts), kld_p99=max(p.kld_p99 for p in parts),
                   same_top_p=mean(p.same_top_p for p in parts), rho_ppl=mean(p.rho_ppl for p in parts),
                   ppl=math.exp(mean(math.log(p.ppl) for p in parts)), seconds=sum(p.seconds for p in parts),
                   chunk_kld=tuple(c for p in parts for c in p.chunk_kld))

    @classmethod
    def from_json(cls, data: dict) -> KldScore:
        return cls(float(data["kld_mean"]), float(data["kld_p99"]), float(data["same_top_p"]), float(data["rho_ppl"]),
                   float(data["ppl"]), float(data.get("seconds", 0.0)), tuple(data.get("chunk_kld", ())))


def kld(model: Path | str, base: BaseLogits, *, threads: int | None = None, ngl: int | None = None,
        log_path: Path | str | None = None) -> KldScore:
    """Score `model` against the saved baseline logits (same ctx and chunks as they were made with)."""
    r, run = kl_divergence(model, base.path, ctx=base.ctx, chunks=base.chunks, threads=threads, ngl=ngl,
                           log_path=log_path)
    try:
        chunks = tuple(parsers.parse_kld_chunks(run.output))
    except parsers.ParseError:
        chunks = ()
    return KldScore(kld_mean=r.kld.mean.value, kld_p99=r.kld.percentiles.get(99.0, float("nan")),
                    same_top_p=r.same_top_p_pct.value, rho_ppl=r.ln_ppl_correlation_pct, ppl=r.ppl_q.value,
                    seconds=run.seconds, chunk_kld=chunks)


@overload
def task(model: Path | str, mode: Literal["hellaswag"], task_file: Path | str, *, tasks: int, ctx: int,
         threads: int | None = None, ngl: int | None = None, log_path: Path | str | None = None,
         build: BuildInfo | None = None) -> parsers.HellaswagResult: ...
@overload
def task(model: Path | str, mode: Literal["winogrande", "multiple-choice"], task_file: Path | str, *, tasks: int,
         ctx: int, threads: int | None = None, ngl: int | None = None, log_path: Path | str | None = None,
         build: BuildInfo | None = None) -> parsers.TaskScore: ...
def task(model: Path | str, mode: TaskMode, task_file: Path | str, *, tasks: int, ctx: int,
         threads: int | None = None, ngl: int | None = None, log_path: Path | str | None = None,
         build: BuildInfo | None = None) -> parsers.HellaswagResult | parsers.TaskScore:
    """Accuracy on a task file: HellaSwag (acc_norm), WinoGrande or multiple choice (ARC, MMLU, TruthfulQA)."""
    build = build or active_build()
    data = ["-bf" if mode == "multiple-choice" else "-f", str(task_file)]
    args = [*_common(model, ctx, None, threads, ngl, build), *data, f"--{mode}", f"--{mode}-tasks", str(tasks)]
    run = run_tool("llama-perplexity", args, log_path=log_path, build=build, meter=_TASK_METERS[mode].expecting(tasks))
    return parsers.parse_run(_TASK_PARSERS[mode], run)
