"""`tbpw inspect FILE.gguf`: how a GGUF was made (tbpw's provenance keys), its type mix per role, its exact bpw."""

from __future__ import annotations

import json

import click

from tbpw.plugin.hookspecs import hookimpl


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _weights(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 10**9 else f"{n / 1e6:.2f} M"


def render(summary) -> str:
    """The summary as `tbpw inspect` prints it."""
    from tbpw.model.provenance import FIELDS

    s = summary
    lines = [f"{s.path}", f"  {s.architecture}, {s.n_tensors} tensors, {_weights(s.n_elements)} weights, "
             f"{_mib(s.file_bytes)} ({s.file_bytes} bytes, {s.metadata_bytes} of metadata)",
             f"  bpw {s.bpw:.6f} (8 x {s.tensor_bytes} tensor bytes / {s.n_elements} weights, metadata excluded)"]
    for key, value in s.general.items():
        lines.append(f"  {key} = {value}")
    lines += ["", "provenance (tbpw.* keys):"]
    if s.provenance:
        width = max(len(FIELDS.get(k, k)) for k in s.provenance)
        lines += [f"  {FIELDS.get(k, k):<{width}}  {v}" for k, v in s.provenance.items()]
    else:
        lines.append("  none: tbpw did not write this file")
    if s.imatrix:
        lines += ["", "imatrix (recorded by llama-quantize):"]
        lines += [f"  {k} = {v}" for k, v in s.imatrix.items()]
    else:
        lines += ["", "imatrix: none recorded"]
    width = max([len("role"), *(len(r.role) for r in s.roles)])
    lines += ["", "types by role:", f"  {'role':<{width}}  tensors  {'bpw':>8}  types"]
    for r in s.roles:
        mix = ", ".join(f"{t} x{n}" if n > 1 else t for t, n in r.types.items())
        lines.append(f"  {r.role:<{width}}  {r.tensors:>7}  {r.bpw:>8.4f}  {mix}")
    total = s.tensor_bytes or 1
    lines += ["", "types overall:"]
    lines += [f"  {t:<8} {n:>5} tensors  {100 * b / total:6.2f}% of tensor bytes" for t, (n, b) in s.types.items()]
    return "\n".join(lines)


@hookimpl
def tbpw_register_commands(cli: click.Group) -> None:
    @cli.command()
    @click.argument("gguf", type=click.Path(dir_okay=False))
    @click.option("--json", "as_json", is_flag=True, help="print everything as one JSON object")
    def inspect(gguf, as_json):
        """Show how GGUF was made (tbpw's provenance), its type mix per role and its exact bpw."""
        from tbpw.cli.support import existing_file
        from tbpw.model.summary import summarize

        summary = summarize(existing_file(gguf, "model file"))
        click.echo(json.dumps(summary.to_json(), indent=1) if as_json else render(summary))
