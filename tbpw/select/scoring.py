"""KL divergence of quantized plans on CALIBRATION text: one set of float logits per model and text, and each
distinct file scored once.

- The float model's logits are saved once per (model, text, ctx, build, GPU layers), with as many chunks as any
  user asked for (calibrate and choose share them: pass the largest count as `chunks`); a span of chunks is
  read from a copy of just those (llama-perplexity --kl-divergence scores every chunk of the file it is given),
  so a plan scored on the first chunks goes on to the next ones without scoring the first again.
- A score is kept keyed by the file's complete type map, the imatrix's content and the span of chunks: a plan two
  targets (or a probe two calibrations) share is scored once, and a rerun scores nothing it already has.
- Screening: `tied_with_leader` is the statistical rule `select_plan` uses after each round to decide which plans
  go on to more chunks: those that may still beat the leader, by more than a margin when one is given.

Everything lives under $TBPW_HOME/calibration/<key>/ (or `cache_dir`); only calibration text is ever read. The
float logits, their windows and every kept score are sealed (tbpw.files.sealed): a damaged one is discarded with a
note and made again, and a score that is not finite is neither kept nor used (it stops the run, naming the file).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

from tbpw.errors import TbpwError
from tbpw.files import paths, sealed
from tbpw.files.atomic import sweep_folder, write_json
from tbpw.files.digest import content_sha256
from tbpw.files.lock import waiting_lock
from tbpw.llamacpp.perplexity import BaseLogits, KldScore, base_logits, base_window, kld
from tbpw.model.inventory import ModelInventory, fingerprint

SCORING_VERSION = 1
# One-sided 95% quantiles of Student's t by degrees of freedom (larger: the normal 1.645).
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
        12: 1.782, 15: 1.753, 20: 1.725, 30: 1.697}
PRINT_PRECISION = 1e-6  # llama-perplexity prints `Mean KLD` with %10.6lf


def t95(df: int) -> float:
    if df < 1:
        return math.inf
    known = [d for d in _T95 if d <= df]
    return _T95[max(known)] if df <= 30 else 1.645


def tied_with_leader(leader: KldScore, other: KldScore, margin: float = 0.0) -> bool:
    """False when `other` is clearly worse than `leader` on the same chunks, or (with `margin`) when it is clearly
    not better than `leader` by more than `margin` of the leader's KLD: either way, scoring it further cannot make
    it the choice by an amount that matters.

    The difference of their mean KLD is compared with its uncertainty, taken from the chunks themselves: with
    per-chunk differences d_1..d_k (paired: both plans scored the same tokens), `other` is out when
    mean(d) > t(0.95, k-1) * sd(d) / sqrt(k) + the print precision of both means - margin * mean(leader), i.e.
    when the upper 95% bound of its possible lead is under `margin` of the leader's KLD (margin 0: under 0, it is
    behind). The per-chunk values carry the rounding of llama-perplexity's running means, which only widens sd(d)
    (more ties, never fewer). Without per-chunk values (fewer than 2 chunks, or a tool that did not print them)
    every plan is tied."""
    a, b = leader.chunk_kld, other.chunk_kld
    if len(a) < 2 or len(a) != len(b):
        return True
    d = [y - x for x, y in zip(a, b)]
    k = len(d)
    mean = sum(d) / k
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (k - 1))
    return (other.kld_mean - leader.kld_mean
            <= t95(k - 1) * sd / math.sqrt(k) + 2 * PRINT_PRECISION - margin * leader.kld_mean)


def finalists(screened: Mapping[str, KldScore], order: Sequence[str], limit: int, margin: float = 0.0) -> list[str]:
    """The plans to score on more chunks: the leader and those tied with it (`tied_with_leader` with `margin`),
    best first, at most `limit` (ties between equal scores go to the earlier plan in `order`)."""
    ranked = sorted(screened, key=lambda n: (screened[n].kld_mean, order.index(n)))
    leader = screened[ranked[0]]
    return [n for n in ranked if n == ranked[0] or tied_with_leader(leader, screened[n], margin)][:max(1, limit)]


def types_key(types: Mapping[str, str], imatrix_hash: str | None) -> str:
    blob = json.dumps({"types": dict(sorted(types.items())), "imatrix": imatrix_hash}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class Scorer:
    """Scores of quantized models of one float model against its logits on one calibration text."""

    def __init__(self, model: Path | str, text: Path | str, *, imatrix: Path | str | None = None, ctx: int = 512,
                 chunks: int = 0, threads: int | None = None, ngl: int | None = None,
                 cache_dir: Path | str | None = None, log: Callable[[str], None] | None = None):
        from tbpw.llamacpp.build import active_build
        from tbpw.llamacpp.offload import gpu_layers

        self.model = Path(model)
        self.text = Path(text)
        if not self.text.is_file():
            raise TbpwError(f"the calibration text {self.text} does not exist: check the path")
        self.imatrix = Path(imatrix) if imatrix is not None else None
        self.ctx = ctx
        self.chunks_hint = chunks  # the most chunks any user of this scorer will ask for
        self.threads = threads
        self.ngl = ngl
        self.build = active_build()
        self._gpu_layers = gpu_layers(self.build, ngl)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else paths.calibration_cache()
        self.log = log or (lambda line: None)
        self.runs = 0  # KLD runs made by this scorer (cached scores cost none)
        self.base_runs = 0  # float-logits runs made by it
        self.seconds = 0.0  # time spent in those runs

    @cached_property
    def imatrix_hash(self) -> str | None:
        return content_sha256(self.imatrix) if self.imatrix is not None else None

    @cached_property
    def folder(self) -> Path:
        parts = {"v": SCORING_VERSION, "model": fingerprint(ModelInventory.load(self.model)),
                 "text": content_sha256(self.text), "ctx": self.ctx, "build": self.build.key, "gpu_layers": self._gpu_layers}
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
        folder = self.cache_dir / key
        folder.mkdir(parents=True, exist_ok=True)
        sweep_folder(folder)  # what a scoring run that was killed left half-written
        sweep_folder(folder / "scores")
        return folder

    def _full(self, chunks: int) -> BaseLogits:
        """The saved logits with at least `chunks` chunks (made now with max(chunks, the hint) when missing)."""
        found = self._saved(chunks)
        if found is None:
            # Stages running at once (tbpw.run.execute) share these logits: one makes them, the others wait for it.
            with waiting_lock(self.folder / ".lock", note=self.log):
                found = self._saved(chunks) or self._make(max(chunks, self.chunks_hint))
        return found

    def _saved(self, chunks: int) -> BaseLogits | None:
        info_path, logits = self.folder / "base.json", self.folder / "base.logits"
        try:
            info = json.loads(info_path.read_text()) if info_path.is_file() else None
        except (OSError, ValueError):
            info = None
        if info is None or info["chunks"] < chunks or not sealed.trusted(logits, "float logits", self.log):
            return None
        return BaseLogits(logits, self.text, self.ctx, info["chunks"], info["ppl"], info["ppl_error"], 0.0)

    def _make(self, want: int) -> BaseLogits:
        logits = self.folder / "base.logits"
        for old in self.folder.glob("base*.logits"):
            sealed.discard(old)
        made = base_logits(self.model, self.text, self.folder / "base.new.logits", ctx=self.ctx, chunks=want,
                           threads=self.threads, ngl=self.ngl, log_path=self.folder / "base.log", build=self.build)
        made.path.replace(logits)
        sealed.write_seal(logits)
        self.base_runs += 1
        self.seconds += made.seconds
        info = {"chunks": want, "ppl": made.ppl, "ppl_error": made.ppl_error}
        write_json(self.folder / "base.json", info)
        self.log(f"  float logits: {want} chunks of {self.ctx} tokens ({made.seconds:.1f} s)")
        return BaseLogits(logits, self.text, self.ctx, want, made.ppl, made.ppl_error, 0.0)

    def base(self, chunks: int, start: int = 0) -> BaseLogits:
        """The float model's logits on chunks [start, chunks) of the text."""
        full = self._full(chunks)
        name = f"base.first-{chunks}.logits" if start == 0 else f"base.{start}-{chunks}.logits"
        window = self.folder / name
        if window.exists() and not sealed.trusted(window, "window of the float logits", self.log):
            pass  # discarded: base_window makes it again from the whole file
        made = base_window(full, start, chunks, window)
        if made.path == window and not sealed.seal_path(window).is_file():
            sealed.write_seal(window)
        return made

    def _score_path(self, types: Mapping[str, str], chunks: int, start: int) -> Path:
        base_chunks = self._full(chunks).chunks
        span = f"{chunks}" if start == 0 else f"{start}-{chunks}"
        return self.folder / "scores" / f"{types_key(types, self.imatrix_hash)}-{span}-of-{base_chunks}.json"

    def lookup(self, types: Mapping[str, str], chunks: int, start: int = 0) -> KldScore | None:
        """The score of a model with `types` on chunks [start, chunks), when one was made before."""
        path = self._score_path(types, chunks, start)
        if not sealed.trusted(path, "kept calibration score", self.log):
            return None
        try:
            found = KldScore.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            found = None
        if found is None or not found.finite():
            sealed.discard(path)
            self.log(f"note: discarded the kept calibration score {path} (it does not hold a finite score); it is "
                     "made again")
            return None
        return found

    def score(self, model: Path | str, types: Mapping[str, str], chunks: int, *, start: int = 0,
              log_path: Path | str | None = None) -> KldScore:
        """Score the quantized `model` (whose tensors have `types`) on chunks [start, chunks), or return the kept
        score."""
        found = self.lookup(types, chunks, start)
        if found is not None:
            return found
        result = kld(model, self.base(chunks, start), threads=self.threads, ngl=self.ngl, log_path=log_path)
        self.runs += 1
        self.seconds += result.seconds
        if not result.finite():
            raise TbpwError(f"the KL divergence of {Path(model).name} on calibration text is {result.kld_mean} (not "
                            f"finite): its outputs are broken or the float logits are; see {log_path or 'its log'}")
        path = self._score_path(types, chunks, start)
        write_json(path, result.to_json())
        sealed.write_seal(path)
        return result
