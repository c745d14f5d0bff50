"""How many layers a llama.cpp run puts on the GPU: one rule for every tool that loads the model.

`ngl=None` means "all of them when the build has a GPU backend, none otherwise"; a number is passed as it
is (0 keeps a GPU build on the CPU). llama-quantize is CPU code and takes no such flag.
"""

from __future__ import annotations

from tbpw.llamacpp.build import BuildInfo

GPU_BACKENDS = frozenset({"cuda", "metal", "vulkan"})
ALL_LAYERS = 99


def gpu_layers(build: BuildInfo, ngl: int | None = None) -> int | None:
    """The layers to offload, or None to leave the flag out (a CPU build)."""
    if ngl is not None:
        return ngl
    return ALL_LAYERS if build.backend in GPU_BACKENDS else None


def offload_args(build: BuildInfo, ngl: int | None = None) -> list[str]:
    layers = gpu_layers(build, ngl)
    return [] if layers is None else ["-ngl", str(layers)]
