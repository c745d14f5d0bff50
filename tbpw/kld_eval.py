"""KL divergence of a quantized model against its baseline's logits (llama-perplexity), as a library call.

`base_logits` runs the baseline once over a text and saves its logits (and the text's tokens) to a file;
`kld` scores a quantized model against that file. The second call takes no text at all: llama-perplexity
reads the tokens back from the logits file, so which text a score is on is decided by whoever made the
logits file. tbpw's selection and calibration only ever make them from CALIBRATION text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import TbpwError
from .llamacpp import parsers
from .llamacpp.tools import run_tool


@dataclass(frozen=True)
class BaseLogits:
    path: Path
    text: Path
    ctx: int
    chunks: int | None
    ppl: float
    seconds: float


def _common(model: Path | str, ctx: int, chunks: int | None, threads: int | None) -> list[str]:
    args = ["-m", str(model), "-c", str(ctx)]
    if chunks:
        args += ["--chunks", str(chunks)]
    if threads:
        args += ["-t", str(threads)]
    return args


def base_logits(model: Path | str, text: Path | str, out: Path | str, *, ctx: int = 512, chunks: int | None = None,
                threads: int | None = None, log_path: Path | str | None = None) -> BaseLogits:
    """Save the baseline's logits over `text` to `out` (reused when `out` and its log exist)."""
    out, text = Path(out), Path(text)
    if not text.is_file():
        raise TbpwError(f"the text {text} does not exist: check the path")
    log_path = Path(log_path) if log_path else out.with_name(out.name + ".log")
    if out.is_file() and log_path.is_file():
        result = parsers.parse_perplexity(log_path.read_text(encoding="utf-8", errors="replace"))
        return BaseLogits(out, text, ctx, chunks, result.ppl.value, 0.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    run = run_tool("llama-perplexity", [*_common(model, ctx, chunks, threads), "-f", str(text),
                                        "--kl-divergence-base", str(partial)], log_path=log_path)
    result = parsers.parse_run(parsers.parse_perplexity, run)
    partial.replace(out)
    return BaseLogits(out, text, ctx, chunks, result.ppl.value, run.seconds)


def calibration_base(model: Path | str, calibration_text: Path | str, work_dir: Path | str, *, ctx: int, chunks: int,
                     threads: int | None = None) -> BaseLogits:
    """The float model's logits on calibration chunks, kept in `work_dir` for every plan scored there."""
    work = Path(work_dir)
    return base_logits(model, calibration_text, work / "calibration-base.logits", ctx=ctx, chunks=chunks,
                       threads=threads, log_path=work / "calibration-base.log")


@dataclass(frozen=True)
class KldScore:
    kld_mean: float
    kld_p99: float
    same_top_p: float
    rho_ppl: float
    ppl: float
    seconds: float

    def to_json(self) -> dict[str, float]:
        return {"kld_mean": self.kld_mean, "kld_p99": self.kld_p99, "same_top_p": self.same_top_p,
                "rho_ppl": self.rho_ppl, "ppl": self.ppl, "seconds": round(self.seconds, 3)}


def kld(model: Path | str, base: BaseLogits, *, threads: int | None = None,
        log_path: Path | str | None = None) -> KldScore:
    """Score `model` against the saved baseline logits (same ctx and chunks as they were made with)."""
    args = [*_common(model, base.ctx, base.chunks, threads), "--kl-divergence-base", str(base.path), "--kl-divergence"]
    run = run_tool("llama-perplexity", args, log_path=log_path)
    r = parsers.parse_run(parsers.parse_kl_divergence, run)
    return KldScore(kld_mean=r.kld.mean.value, kld_p99=r.kld.percentiles.get(99.0, float("nan")),
                    same_top_p=r.same_top_p_pct.value, rho_ppl=r.ln_ppl_correlation_pct, ppl=r.ppl_q.value,
                    seconds=run.seconds)
