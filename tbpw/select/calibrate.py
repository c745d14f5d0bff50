"""Calibrate a proxy error table to measured KL divergence ("kld-calibrated").

A proxy error (weighted MSE and friends) ranks the candidate types of ONE tensor well, but says little about
how much a unit of error in one tensor costs the model's output compared with a unit in another: an error in
output.weight or in the first layer's value projection moves the logits far more than the same error in a
middle layer's ffn_up. Summing raw proxy errors over tensors is where allocators lose to stock's hand-made
rules around 4-5 bpw.

So, per group (one tensor, or one role across layers): quantize that group ALONE to a probe type (every
other tensor keeps its float type), measure the KL divergence against the float model on a few chunks of
CALIBRATION text, and fit `scale = measured KLD / proxy error of the group at that type`. With several
probe types, the log-scale is interpolated in bits per weight between them (and held flat outside).
`calibrated_table` multiplies each candidate's error by its tensor's scale: the allocator then minimises
an estimate of the summed KLD increase instead of the summed proxy.

Results are cached like error tables (under the cache's sensitivity/, keyed by model, imatrix, text,
table, probes, grouping, ctx, chunks and build), one process per entry at a time; a cached result that does
not parse or does not cover the model is measured again.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tbpw.errors import TbpwError
from tbpw.files import paths, sealed
from tbpw.files.atomic import sweep_folder, temporary_folder, write_json, write_text
from tbpw.files.digest import content_sha256
from tbpw.files.lock import waiting_lock
from tbpw.measure.engine import cache_key, model_fingerprint
from tbpw.measure.table import CandidateError, ErrorTable, TensorErrors
from tbpw.model.inventory import ModelInventory
from tbpw.select.options import CalibrateOptions
from tbpw.select.scoring import Scorer

if TYPE_CHECKING:
    from tbpw.quantize.store import TensorStore

SENSITIVITY_VERSION = 1
Grouping = Literal["tensor", "role"]
# A group whose measured KLD does not rise above the all-float run's is not free: it is below what this many
# chunks can resolve. Its scale is floored at this fraction of the median scale.
MIN_SCALE_FRACTION = 0.05


@dataclass
class Sensitivity:
    probe_types: tuple[str, ...]
    grouping: str
    groups: dict[str, list[str]]  # group -> tensor names
    measured: dict[str, dict[str, float]]  # group -> probe type -> KLD increase
    proxy: dict[str, dict[str, float]]  # group -> probe type -> summed proxy error
    probe_bpw: dict[str, dict[str, float]]  # tensor -> probe type -> its bpw as that type (after fallbacks)
    floor_kld: float  # KLD of the background alone, subtracted from each probe's (0 for a float background)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"version": SENSITIVITY_VERSION, "probe_types": list(self.probe_types), "grouping": self.grouping,
                "groups": self.groups, "measured": self.measured, "proxy": self.proxy, "probe_bpw": self.probe_bpw,
                "floor_kld": self.floor_kld, "meta": self.meta}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sensitivity:
        return cls(tuple(data["probe_types"]), data["grouping"], dict(data["groups"]), dict(data["measured"]),
                   dict(data["proxy"]), dict(data["probe_bpw"]), float(data["floor_kld"]), dict(data.get("meta", {})))

    def group_scales(self) -> dict[str, dict[str, float]]:
        """group -> probe type -> scale (finite, positive)."""
        raw: dict[str, dict[str, float]] = {}
        for group, by_type in self.measured.items():
            raw[group] = {}
            for t, delta in by_type.items():
                proxy = self.proxy[group][t]
                raw[group][t] = (delta / proxy) if proxy > 0 and delta > 0 else float("nan")
        for t in self.probe_types:
            good = sorted(v[t] for v in raw.values() if math.isfinite(v[t]))
            if not good:
                raise TbpwError(f"no group's KL divergence rose measurably at {t}: use a lower probe type or more chunks")
            floor = good[len(good) // 2] * MIN_SCALE_FRACTION
            for v in raw.values():
                v[t] = max(v[t], floor) if math.isfinite(v[t]) else floor
        return raw

    def tensor_scales(self) -> dict[str, dict[str, float]]:
        """tensor -> probe type -> scale."""
        scales = self.group_scales()
        return {name: scales[group] for group, names in self.groups.items() for name in names}

    def scale_at(self, tensor: str, bpw: float, scales: Mapping[str, Mapping[str, float]] | None = None) -> float:
        """The tensor's scale at `bpw`: log-linear between the probes' bpw, flat outside."""
        by_type = (scales or self.tensor_scales())[tensor]
        points = sorted((self.probe_bpw[tensor][t], math.log(s)) for t, s in by_type.items())
        if bpw <= points[0][0]:
            return math.exp(points[0][1])
        for (b0, l0), (b1, l1) in zip(points, points[1:]):
            if bpw <= b1:
                w = (bpw - b0) / (b1 - b0) if b1 > b0 else 1.0
                return math.exp(l0 + w * (l1 - l0))
        return math.exp(points[-1][1])


def calibrated_table(table: ErrorTable, sens: Sensitivity, strength: float = 1.0) -> ErrorTable:
    """`table` with every candidate error multiplied by its tensor's measured-sensitivity scale (raised to
    `strength`: 1 trusts the measurement fully, 0 gives back the proxy; values between hedge against
    calibration noise, and the choice among them is best left to `select_plan`)."""
    scales = sens.tensor_scales()
    tensors = []
    for t in table.tensors:
        if t.name not in scales:
            raise TbpwError(f"the sensitivity has no scale for {t.name}: calibrate it for this table's model")
        cands = [CandidateError(c.type, c.bytes,
                                c.error * sens.scale_at(t.name, 8.0 * c.bytes / t.n_elements, scales) ** strength)
                 for c in t.candidates]
        tensors.append(TensorErrors(t.name, t.n_elements, cands))
    return ErrorTable(tensors, dict(table.meta, transform="kld-calibrated", sensitivity=sens.meta.get("key"),
                                          strength=strength))


def groups_of(inventory: ModelInventory, grouping: Grouping) -> dict[str, list[str]]:
    decidable = [t for t in inventory.tensors if t.quantizable]
    if grouping == "tensor":
        return {t.name: [t.name] for t in decidable}
    if grouping == "role":
        groups: dict[str, list[str]] = {}
        for t in decidable:
            groups.setdefault(t.role, []).append(t.name)
        return groups
    raise TbpwError(f"unknown sensitivity grouping {grouping!r}: use tensor or role")


def proxy_at(entry: TensorErrors, type_name_: str, bpw: float) -> float:
    """The table's error of `entry` as `type_name_`; when a reduced table dropped that type, the error
    log-linearly interpolated in bpw between its neighbouring candidates (clamped at the ends)."""
    for c in entry.candidates:
        if c.type == type_name_:
            return c.error
    points = sorted((8.0 * c.bytes / entry.n_elements, c.error) for c in entry.candidates if c.error > 0)
    if not points:
        raise TbpwError(f"the error table has no positive error for {entry.name}: measure it again")
    if bpw <= points[0][0]:
        return points[0][1]
    for (b0, e0), (b1, e1) in zip(points, points[1:]):
        if bpw <= b1:
            w = (bpw - b0) / (b1 - b0) if b1 > b0 else 1.0
            return math.exp(math.log(e0) + w * (math.log(e1) - math.log(e0)))
    return points[-1][1]


def _table_hash(table: ErrorTable) -> str:
    data = [[t.name, [[c.type, c.bytes, c.error] for c in t.candidates]] for t in table.tensors]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:20]


def calibrate(model: Path | str, imatrix: Path | str | None, calibration_text: Path | str, table: ErrorTable,
              options: CalibrateOptions, *, threads: int | None = None, ngl: int | None = None,
              cache_dir: Path | str | None = None, scorer: Scorer | None = None, store: TensorStore | None = None,
              log: Callable[[str], None] | None = None) -> Sensitivity:
    """Measure (or load from the cache) the sensitivity of every group of `model` (see the module doc).

    `options` gives the probe types, the grouping, the chunks and ctx scored, and the `background`: the type
    every tensor outside the probed group keeps, `float` (its stored type) or a near-lossless type such as Q8_0
    (half the disk and load time of each probe; the noise floor is then the all-Q8_0 model's KLD); its
    `strengths` are the caller's (`calibrated_table`). `scorer` shares the float logits and kept scores with
    `choose` (its ctx must be `options.ctx`); `store` writes the probes from tensors quantized once (else
    llama-quantize writes each)."""
    from tbpw.llamacpp.build import active_build

    model, calibration_text = Path(model), Path(calibration_text)
    inventory = ModelInventory.load(model)
    probes, grouping, ctx, chunks, bg = (tuple(options.probes), options.grouping, options.ctx, options.chunks,
                                         options.background)
    groups = groups_of(inventory, grouping)
    entries = table.by_name()
    build = active_build()
    parts = {"version": SENSITIVITY_VERSION, "model": model_fingerprint(inventory),
             "imatrix": content_sha256(Path(imatrix)) if imatrix else None, "text": content_sha256(calibration_text),
             "table": _table_hash(table), "probes": list(probes), "grouping": grouping, "ctx": ctx, "chunks": chunks,
             "build": build.key, **({"background": bg} if bg != "float" else {})}
    key = cache_key(parts)
    folder = (Path(cache_dir) if cache_dir else paths.sensitivity_cache()) / key
    final = folder / "sensitivity.json"
    if (cached := _cached(final, groups)) is not None:
        return cached
    if scorer is not None and scorer.ctx != ctx:
        raise TbpwError(f"the shared scorer works at ctx {scorer.ctx}, calibration at {ctx}: give both the same ctx")
    with waiting_lock(folder / ".lock", note=lambda line: (log or print)(f"note: {line}")):
        if (cached := _cached(final, groups)) is not None:
            return cached
        sweep_folder(folder)  # work folders of calibrations that were killed, or failed a day ago
        probing = _Probing(model, imatrix, calibration_text, inventory, options, threads, ngl, store, log)
        sens = probing.measure(entries, groups, folder, scorer)
        sens.meta.update({"key": key, **parts, "model_path": str(model), "text_path": str(calibration_text)})
        sens.group_scales()  # fails now, not later, when nothing was measurable
        write_json(final, sens.to_json())
        sealed.write_seal(final)
        sens.meta["cached"] = False
        return sens


def _cached(final: Path, groups: Mapping[str, list[str]]) -> Sensitivity | None:
    """A finished measurement of the cache, or None; a damaged one (or one of other groups) is dropped."""
    if not sealed.trusted(final, "cached sensitivity"):
        return None
    try:
        sens = Sensitivity.from_json(json.loads(final.read_text(encoding="utf-8")))
        ok = (sens.groups == dict(groups) and all(g in sens.measured and g in sens.proxy for g in groups)
              and all(math.isfinite(v) for table in (sens.measured, sens.proxy) for by_type in table.values()
                      for v in by_type.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        print(f"note: discarding the damaged cached sensitivity {final}; measuring again", file=sys.stderr)
        sealed.discard(final)
        return None
    sens.meta["cached"] = True
    return sens


@dataclass
class _Probing:
    """One calibration's fixed parts: the model, its imatrix and text, the options and how to write and score."""

    model: Path
    imatrix: Path | str | None
    text: Path
    inventory: ModelInventory
    options: CalibrateOptions
    threads: int | None
    ngl: int | None
    store: TensorStore | None
    log: Callable[[str], None] | None

    def measure(self, entries: Mapping[str, TensorErrors], groups: dict[str, list[str]], folder: Path,
                scorer: Scorer | None) -> Sensitivity:
        """Each group alone at each probe type, scored against the float model (the tools' work files in
        `folder`/work, removed at the end)."""
        from tbpw.llamacpp.build import active_build
        from tbpw.llamacpp.quantize import quantize, tensor_type_text
        from tbpw.quantize.assemble import assemble, unsupported

        build = active_build()
        inventory, probes, bg = self.inventory, tuple(self.options.probes), self.options.background
        ctx, chunks = self.options.ctx, self.options.chunks
        probe_bpw: dict[str, dict[str, float]] = {}
        proxy: dict[str, dict[str, float]] = {g: {} for g in groups}
        for group, names in groups.items():
            for t in probes:
                total = 0.0
                for name in names:
                    info = inventory[name]
                    eff = info.effective_type(t)
                    if name not in entries:
                        raise TbpwError(f"the error table has no entry for {name}: measure this model first")
                    bpw = 8.0 * info.bytes_as(eff) / info.n_elements
                    total += proxy_at(entries[name], eff, bpw)
                    probe_bpw.setdefault(name, {})[t] = bpw
                proxy[group][t] = total

        work = temporary_folder(folder / "work")
        say = self.log or (lambda line: None)
        scorer = scorer or Scorer(self.model, self.text, imatrix=self.imatrix, ctx=ctx, chunks=chunks,
                                  threads=self.threads, ngl=self.ngl, cache_dir=work / "scores", log=say)
        source = self.store.source(self.model, self.imatrix) if self.store is not None else None
        try:
            rest = {t.name: (t.stored_type if bg == "float" else t.effective_type(bg))
                    for t in inventory.tensors if t.quantizable}

            def delta(types: Mapping[str, str], label: str) -> float:
                score = scorer.lookup(types, chunks)
                if score is None:
                    out = work / "probe.gguf"
                    if source is not None and unsupported(source, types) is None:
                        assemble(source, types, out)
                    else:
                        write_text(work / "types.txt", tensor_type_text(types))
                        quantize(self.model, out, imatrix=self.imatrix, tensor_type_file=work / "types.txt",
                                 threads=self.threads, log_path=work / "quantize.log", build=build)
                    score = scorer.score(out, types, chunks, log_path=work / "kld.log")
                    out.unlink()
                say(f"  {label}: KLD {score.kld_mean:.6f}")
                return score.kld_mean

            # The float model scored against its own logits is 0 (a deterministic run of the same file): not run.
            floor = 0.0 if bg == "float" else delta(rest, f"all {bg}")
            measured: dict[str, dict[str, float]] = {}
            for group, names in groups.items():
                measured[group] = {}
                for t in probes:
                    types = dict(rest, **{n: inventory[n].effective_type(t) for n in names})
                    measured[group][t] = delta(types, f"{group} as {t}") - floor
        except TbpwError:
            # the tools' logs stay for the message that names them; the large files go
            for big in [*work.glob("*.gguf"), *work.glob("*.logits")]:
                big.unlink(missing_ok=True)
            raise
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        shutil.rmtree(work, ignore_errors=True)
        return Sensitivity(probes, self.options.grouping, groups, measured, proxy, probe_bpw, floor, {})
