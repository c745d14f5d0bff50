"""What `tbpw doctor` reports: the active build, what its tools say about themselves, and any mismatch."""

from __future__ import annotations

import platform
import sys
from typing import Any

from tbpw.files import paths
from tbpw.llamacpp import logflush
from tbpw.llamacpp.build import TOOLS, BuildInfo, active_build
from tbpw.llamacpp.features import detect
from tbpw.version import __version__


def report(build: BuildInfo | None = None) -> dict[str, Any]:
    """A JSON-ready description of the active build; raises TbpwError when there is none."""
    build = build or active_build()
    features = detect(build)
    warnings = []
    if build.build_number and features.build_number != build.build_number:
        warnings.append(f"the tools report build {features.build_number}, the pin says {build.build_number}: "
                        "rebuild with `tbpw build --force`")
    if build.backend in ("cuda", "metal", "vulkan") and not features.devices:
        warnings.append(f"a {build.backend} build that sees no {build.backend} device: the tools will run on the CPU")
    if not features.version_from.startswith("llama-bench"):
        warnings.append(f"llama-bench of this build has no --version: the version is from {features.version_from}")
    flush = logflush.status()
    if not flush["active"]:
        warnings.append(f"llama.cpp output is not protected against lost final lines ({flush['reason']})")
    return {
        "tbpw": {"version": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
                 "home": str(paths.home())},
        "build": {
            "source": build.source_name,
            "source_identity": build.source_identity,
            "build_number": build.build_number,
            "build_commit": build.build_commit,
            "backend": build.backend,
            "key": build.key,
            "root": str(build.root),
            "log": str(build.log_path),
            "seconds": round(build.seconds, 1),
            "cmake_flags": list(build.cmake_flags),
            "tools": {tool: str(build.tool(tool)) for tool in TOOLS},
            "libggml_base": str(build.library("ggml-base")),
        },
        "detected": {
            "version": features.version,
            "version_from": features.version_from,
            "build_number": features.build_number,
            "commit": features.commit,
            "compiler": features.compiler,
            "target": features.target,
            "devices": features.devices,
            "quantize_types": features.quantize_types,
        },
        "features": features.notable(),
        "output_flush": flush,
        "warnings": warnings,
    }
