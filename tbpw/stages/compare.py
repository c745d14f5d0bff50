"""Stage `compare-files`: other people's GGUFs in a run's comparison (a recipe's `compare_files:`): where each one
is, and the proof that it is a quant of the run's model (same architecture, tensor names and shapes) before
anything is spent on it. They are evaluated and benched like the run's own quants, and marked as not made by the
run.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pydantic import Field, model_validator

from tbpw.errors import TbpwError
from tbpw.model.inventory import ModelInventory
from tbpw.options import Strict
from tbpw.stages.context import StageContext
from tbpw.stages.cost import Cost, ModelSize
from tbpw.stages.quant import Quant

NAME = "compare-files"


class CompareFile(Strict):
    """Someone else's GGUF of the same model (a local path, or a file of a hub repository), evaluated and benched
    like the run's own quants and marked as not made by the run."""

    path: Path | None = None
    hub: str | None = Field(None, pattern=r"^[\w.-]+/[\w.-]+$")  # owner/name of a model repository
    file: str | None = None  # the GGUF in that repository
    revision: str = "main"
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]+$")  # its name in the tables; default: the file's stem

    @model_validator(mode="after")
    def _one_place(self) -> CompareFile:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give either path, or hub and file")
        if self.hub is not None and not self.file:
            raise ValueError("a hub repository needs `file`: the GGUF to compare with")
        if self.path is not None and self.file is not None:
            raise ValueError("`file` names a file of a hub repository: give path alone for a local file")
        return self

    @property
    def name(self) -> str:
        """`other-<label>`: the quant's name in the run."""
        stem = Path(str(self.path if self.path is not None else self.file)).name.removesuffix(".gguf")
        return f"other-{self.label or stem}"


def locate(ref: CompareFile, where: str) -> Path:
    """The GGUF `ref` names: a local path, or a hub file through huggingface_hub (its cache, or a download)."""
    if ref.path is not None:
        path = Path(ref.path).expanduser()
        if not path.is_file():
            raise TbpwError(f"{where}: {path} does not exist: fix the path")
        return path
    assert ref.hub is not None and ref.file is not None  # CompareFile is a path or a hub file
    try:
        hub = importlib.import_module("huggingface_hub")
    except ImportError:
        raise TbpwError(f"{where}: a hub file needs huggingface_hub: pip install 'tbpw[hub]'") from None
    try:
        return Path(hub.hf_hub_download(ref.hub, ref.file, revision=ref.revision))
    except Exception as exc:  # huggingface_hub raises many kinds; all mean "not here"
        constants = importlib.import_module("huggingface_hub.constants")
        cache = Path(constants.HF_HUB_CACHE) / f"models--{ref.hub.replace('/', '--')}"
        raise TbpwError(f"{where}: could not get {ref.file} from {ref.hub}@{ref.revision} ({type(exc).__name__}): "
                        f"check the names and the network, or fill {cache} (`hf download {ref.hub} {ref.file} "
                        f"--revision {ref.revision}` where the hub is reachable)") from None


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def check_same_model(model: ModelInventory, other: ModelInventory, where: str) -> None:
    """Raise unless `other` holds the tensors of `model` (names and shapes) for the same architecture."""
    name = other.path.name
    fix = "give a quant of the run's model"
    if other.architecture != model.architecture:
        raise TbpwError(f"{where}: {name} is a {other.architecture} model, the run's model is {model.architecture}: {fix}")
    ours, theirs = model.by_name, other.by_name
    missing = [n for n in ours if n not in theirs]
    if missing:
        raise TbpwError(f"{where}: {name} has no tensor {missing[0]} ({len(missing)} of the model's tensors are "
                        f"missing): it is not a quant of this model; {fix}")
    extra = [n for n in theirs if n not in ours]
    if extra:
        raise TbpwError(f"{where}: {name} has a tensor {extra[0]} the model lacks ({len(extra)} in all): it is "
                        f"not a quant of this model; {fix}")
    for tensor in model.tensors:
        if theirs[tensor.name].shape != tensor.shape:
            raise TbpwError(f"{where}: {name} has {tensor.name} of shape {_shape(theirs[tensor.name].shape)}, the "
                            f"model {_shape(tensor.shape)}: it is not a quant of this model; {fix}")


def another_name(model: ModelInventory, other: ModelInventory) -> str | None:
    """Why a file with the model's tensors may still be a quant of another model (a fine-tune, a sibling of the same
    architecture): it names another model."""
    ours, theirs = model.metadata("general.name"), other.metadata("general.name")
    if isinstance(ours, str) and isinstance(theirs, str) and ours.strip().lower() != theirs.strip().lower():
        return f"it names itself {theirs!r}, the run's model {ours!r}: it may be a quant of another model"
    return None


def describe(ref: CompareFile) -> str:
    """Where the file comes from, for the report."""
    if ref.path is not None:
        return f"local file {Path(ref.path).name}"  # its folder is the user's own: not for the report
    return f"{ref.hub}@{ref.revision} {ref.file} (Hugging Face hub)"


def run(ctx: StageContext, model: Path, files: list[CompareFile]) -> list[Quant]:
    """The files, each found and checked to be a quant of `model` (before any work on it)."""
    base = ModelInventory.load(model)
    quants = []
    for i, ref in enumerate(files):
        where = f"compare_files.{i}"
        path = locate(ref, where)
        other = ModelInventory.load(path)
        check_same_model(base, other, where)
        note = f"not made by this run: {describe(ref)}"
        if (doubt := another_name(base, other)) is not None:
            ctx.log(f"warning: {ref.name}: {doubt}")
            note += f"; {doubt}"
        quants.append(Quant(ref.name, "other", path, other.bpw(), path.stat().st_size, types=other.types(),
                            note=note))
        ctx.log(f"other {ref.name}  ({other.bpw():.4f} bpw, {describe(ref)})")
    return quants


def cost(size: ModelSize | None) -> Cost:
    """Headers read; the files are the user's (a hub file may be downloaded: not counted)."""
    return Cost()
