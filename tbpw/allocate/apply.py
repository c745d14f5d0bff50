"""Apply a plan with stock llama-quantize (or assemble its file from the tensor store) and prove the file is the plan.

Every decided tensor (allocated or pinned) is named in a `--tensor-type-file` by an anchored, escaped
pattern, llama-quantize runs with the imatrix and a quantized base type, and the file it wrote is read
back: each tensor must have its planned type and the achieved bpw must be the planned one. Any
difference is an error and no output file appears; the model is renamed into place only once checked.

With a tensor store (`tbpw.quantize.store`), the same file is assembled from tensors quantized once each
(byte-identical to llama-quantize's, tests/test_store.py) and checked the same way; llama-quantize stays the
path for a type the libggml bridge cannot write.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tbpw.allocate.plan import Plan
from tbpw.errors import TbpwError
from tbpw.files.atomic import atomic_path, write_json, write_text
from tbpw.files.outputs import refuse_overwriting_inputs
from tbpw.llamacpp.build import BuildInfo
from tbpw.llamacpp.quantize import BASE_TYPE, quantize, tensor_type_text
from tbpw.llamacpp.quantize_layout import file_type_override
from tbpw.model.inventory import ModelInventory

if TYPE_CHECKING:
    from tbpw.quantize.store import StoreSource


@dataclass(frozen=True)
class Applied:
    path: Path  # the verified model
    plan_path: Path  # the plan, as JSON, next to it
    tensor_type_file: Path
    log_path: Path
    achieved_bpw: float
    file_bytes: int
    seconds: float  # llama-quantize's run time, or the assembly's
    assembled: bool = False  # True: written from the tensor store, not by llama-quantize
    quantized: int = 0  # tensors the store quantized for this file (assembled files only)


def plan_path_for(out: Path | str) -> Path:
    """`OUT.gguf` -> `OUT.plan.json`."""
    out = Path(out)
    return out.with_name((out.name[:-5] if out.name.endswith(".gguf") else out.name) + ".plan.json")


def written_files(out: Path | str, log_path: Path | str | None = None) -> dict[str, Path]:
    """Every file `apply_plan` writes for the output `out`: the model, its plan, its tensor-type file, its log."""
    out = Path(out)
    stem = out.name[:-5] if out.name.endswith(".gguf") else out.name
    return {"output": out, "plan file": plan_path_for(out), "tensor-type file": out.with_name(stem + ".tensor-types.txt"),
            "log": Path(log_path) if log_path else out.with_name(stem + ".quantize.log")}


def check_model(plan: Plan, inventory: ModelInventory) -> None:
    """The plan must describe exactly this model's tensors."""
    # llama-quantize may write the tensors in another order than the input's
    names = sorted(t.name for t in plan.tensors)
    if names != sorted(t.name for t in inventory.tensors) or plan.n_elements != inventory.n_elements:
        raise TbpwError(f"the plan was made for another model than {inventory.path.name} (its tensors differ): "
                        "make the plan from this model")


def verify_output(plan: Plan, path: Path | str) -> ModelInventory:
    """Raise unless the GGUF at `path` has every tensor in its planned type and the planned bpw."""
    written = ModelInventory.load(path)
    check_model(plan, written)
    wrong = [(t.name, t.type, written[t.name].stored_type) for t in plan.tensors if written[t.name].stored_type != t.type]
    if wrong:
        name, planned, got = wrong[0]
        raise TbpwError(f"llama-quantize wrote {name} as {got}, the plan says {planned} ({len(wrong)} tensor(s) differ): "
                        "the build does not honour the tensor-type file; check the log")
    sizes = [(t.name, t.bytes, written[t.name].stored_bytes) for t in plan.tensors if written[t.name].stored_bytes != t.bytes]
    if sizes:
        name, planned_bytes, got_bytes = sizes[0]
        raise TbpwError(f"{name} has {got_bytes} bytes in the output, the plan says {planned_bytes}: "
                        "tbpw's byte accounting does not match this build; report it")
    achieved = written.bpw()
    if achieved != plan.achieved_bpw:
        raise TbpwError(f"the output has {achieved:.6f} bpw, the plan {plan.achieved_bpw:.6f}: report it")
    return written


def apply_plan(plan: Plan, model: Path | str, imatrix: Path | str | None, out: Path | str, *,
               threads: int | None = None, log_path: Path | str | None = None, base_type: str = BASE_TYPE,
               build: BuildInfo | None = None, kv: Mapping[str, str] | None = None,
               store: StoreSource | None = None) -> Applied:
    """Write `out` from `model` as `plan` says, verify it, and save the plan as JSON next to it; `kv` are string
    keys the file's metadata records (the plan's `metadata_bytes` should count them).

    With `store` (bound to this model and imatrix), the file is assembled from quantized tensors instead of
    running llama-quantize, unless a planned type is one the store cannot write."""
    model, out = Path(model), Path(out)
    files = written_files(out, log_path)
    refuse_overwriting_inputs(files, {"model": model, "imatrix": imatrix})
    inventory = ModelInventory.load(model)
    check_model(plan, inventory)
    decided = plan.decided()
    if any(inventory[n].stored_type not in ("F32", "F16", "BF16") for n in decided):
        raise TbpwError(f"{model.name} already has quantized tensors: start from the F16/BF16/F32 model "
                        "(requantizing loses quality and changes what the errors were measured on)")
    log_path, type_file, plan_path = files["log"], files["tensor-type file"], files["plan file"]
    write_text(type_file, tensor_type_text(decided))
    assembled = None
    if store is not None:
        from tbpw.quantize.assemble import assemble, unsupported

        if store.inventory.path.resolve() != model.resolve() or \
                (store.imatrix_path.resolve() if store.imatrix_path else None) != (Path(imatrix).resolve() if imatrix else None):
            raise TbpwError("the tensor store was opened for another model or imatrix than the plan's: open it for this one")
        if unsupported(store, plan.types(), base_type) is not None:
            store = None
    # the label of a mixed file: the stock type nearest below its size, not the base type it is written with
    label = file_type_override(plan.achieved_bpw)
    with atomic_path(out) as tmp:
        if store is not None:
            assembled = assemble(store, plan.types(), tmp, base_type=base_type,
                                 overrides=[*(f"{key}=str:{value}" for key, value in (kv or {}).items()), label])
            write_text(log_path, f"assembled from the tensor store {store.folder}: {assembled.quantized} tensor(s) "
                                 f"quantized now, the rest found or copied, {assembled.seconds:.2f} s\n")
            seconds = assembled.seconds
        else:
            run = quantize(model, tmp, imatrix=imatrix, tensor_type_file=type_file, base_type=base_type,
                           threads=threads, kv=kv, overrides=[label], log_path=log_path, build=build)
            seconds = run.seconds
        written = verify_output(plan, tmp)
        if plan.target.size is not None and tmp.stat().st_size > plan.target.size:
            raise TbpwError(f"the output has {tmp.stat().st_size} bytes, over the target of {plan.target.size}: "
                            "its metadata grew more than tbpw expected; report it")
        write_json(plan_path, {**plan.to_json(), "file_bytes": tmp.stat().st_size})
        file_bytes = tmp.stat().st_size
    return Applied(path=out, plan_path=plan_path, tensor_type_file=type_file, log_path=Path(log_path),
                   achieved_bpw=written.bpw(), file_bytes=file_bytes, seconds=seconds, assembled=assembled is not None,
                   quantized=assembled.quantized if assembled is not None else 0)
