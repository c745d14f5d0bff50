"""What the active llama.cpp build can do, asked of the tools themselves (their --help and --version).

Source pins say what a build should be; the tools say what it is. A local checkout or the fork may
have options stock b11312 lacks (``--target-bpw``, ``--state-file``), so code that needs an option calls
``ensure_tool_features`` instead of trusting the pin. Results are cached in the build folder, keyed by
the size and mtime of the tool binaries, so detection costs ~0.1 s once per build.

Detection only asks a tool for what its own --help lists: other trees lack flags stock b11312 has (the
target-bpw fork's llama-bench has no ``--version``), and a missing flag is a fact to report, not a
broken build. The version comes from the first tool that lists ``--version`` (VERSION_TOOLS order), else
from the build's own record (build.json), and ``version_from`` says which.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from tbpw.errors import TbpwError
from tbpw.files.atomic import write_json
from tbpw.llamacpp.build import TOOLS, BuildInfo, active_build
from tbpw.llamacpp.parsers import ParseError, VersionInfo, parse_version
from tbpw.llamacpp.tools import run_tool

CACHE_FILE = "features.json"
# Bump when detection changes, so stale cache files are recomputed.
DETECTION_VERSION = 3
# Tools asked for `--version`, in this order, among those whose --help lists it.
VERSION_TOOLS = ("llama-bench", "llama-perplexity", "llama-imatrix", "llama-quantize")

# Options whose presence tbpw reports by name (`tbpw doctor`); anything else is still in `options`.
NOTABLE = {
    "llama-quantize": ("--tensor-type-file", "--tensor-type", "--dry-run", "--imatrix", "--output-tensor-type",
                       "--token-embedding-type", "--prune-layers", "--keep-split", "--override-kv",
                       "--target-bpw", "--state-file"),
    "llama-imatrix": ("--output-format", "--in-file", "--process-output", "--show-statistics", "--chunks"),
    "llama-perplexity": ("--kl-divergence-base", "--kl-divergence", "--hellaswag", "--winogrande",
                         "--multiple-choice"),
    "llama-bench": ("--output", "--list-devices", "--n-depth"),
}

_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
_QUANT_TYPE = re.compile(r"^\s+(?:\d+\s+or\s+)?([A-Z][A-Z0-9_]+)\s+:", re.M)


@dataclass(frozen=True)
class ToolFeatures:
    """Version and options of each tool of one build."""

    version: str
    build_number: int
    commit: str
    compiler: str | None
    target: str | None
    options: dict[str, list[str]]  # tool -> sorted long options from its --help
    quantize_types: list[str]  # the base types llama-quantize accepts (its "allowed quantization types")
    devices: list[str]  # accelerator devices the build sees (empty on a CPU build)
    version_from: str = "llama-bench --version"  # where `version` came from (a tool, or build.json)

    def has(self, option: str, tool: str = "llama-quantize") -> bool:
        return option in self.options.get(tool, ())

    @property
    def tensor_type_file(self) -> bool:
        return self.has("--tensor-type-file")

    @property
    def dry_run(self) -> bool:
        return self.has("--dry-run")

    @property
    def target_bpw(self) -> bool:
        return self.has("--target-bpw")

    @property
    def state_file(self) -> bool:
        return self.has("--state-file")

    def notable(self) -> dict[str, dict[str, bool]]:
        """tool -> {option: present} for the options tbpw cares about."""
        return {tool: {opt: self.has(opt, tool) for opt in opts} for tool, opts in NOTABLE.items()}

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ToolFeatures:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


def parse_help_options(text: str) -> list[str]:
    """Long options named in a tool's --help text."""
    return sorted(set(_OPTION.findall(text)))


def parse_quantize_types(text: str) -> list[str]:
    """The names in llama-quantize's `allowed quantization types` list (Q4_K_M, IQ4_XS, COPY, ...)."""
    _, sep, table = text.partition("allowed quantization types")
    if not sep:
        return []
    # The help is printed twice by some builds (usage then the list again): keep first occurrences.
    return list(dict.fromkeys(_QUANT_TYPE.findall(table.split("usage:")[0])))


def parse_devices(text: str) -> list[str]:
    """`--list-devices`: the lines under `Available devices:` (`(none)` on a CPU build)."""
    _, sep, rest = text.partition("Available devices:")
    if not sep:
        return []
    devices = []
    for line in rest.splitlines()[1:]:
        if not line.startswith(" "):
            break
        entry = line.strip()
        if entry and entry != "(none)":
            devices.append(entry)
    return devices


def version_tools(options: dict[str, list[str]]) -> list[str]:
    """The tools whose --help lists `--version`, in the order they are asked (VERSION_TOOLS)."""
    return [tool for tool in VERSION_TOOLS if "--version" in options.get(tool, ())]


def _fingerprint(build: BuildInfo) -> list[list]:
    out = []
    for tool in TOOLS:
        st = build.tool(tool).stat()
        out.append([tool, st.st_size, st.st_mtime_ns])
    return out


def detect(build: BuildInfo | None = None, *, refresh: bool = False) -> ToolFeatures:
    """Features of `build` (default: the active one), from the cache when its tools are unchanged."""
    build = build or active_build()
    cache = build.root / CACHE_FILE
    fingerprint = _fingerprint(build)
    if not refresh and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("detection") == DETECTION_VERSION and data.get("fingerprint") == fingerprint:
                return ToolFeatures.from_json(data["features"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache is recomputed
    features = _probe(build)
    try:
        write_json(cache, {"detection": DETECTION_VERSION, "fingerprint": fingerprint, "features": features.to_json()})
    except OSError:
        pass  # a read-only build folder (TBPW_BUILD) still works, uncached
    return features


def _probe(build: BuildInfo) -> ToolFeatures:
    logs = _log_dir(build)
    options: dict[str, list[str]] = {}
    quantize_types: list[str] = []
    for tool in TOOLS:
        # llama-quantize exits 1 after --help; the others exit 0. Either way the text is what counts.
        run = run_tool(tool, ["--help"], log_path=logs / f"{tool}.help.log", build=build, check=False, timeout=60)
        options[tool] = parse_help_options(run.output)
        if not options[tool]:
            raise TbpwError(f"{tool} --help printed no options (exit {run.returncode}); the build looks broken: "
                            f"run `tbpw build --force` (log: {run.log_path})")
        if tool == "llama-quantize":
            quantize_types = parse_quantize_types(run.output)
    version, version_from = None, ""
    tried = []
    for tool in version_tools(options):
        run = run_tool(tool, ["--version"], log_path=logs / f"{tool}.version.log", build=build, check=False, timeout=60)
        try:
            version, version_from = parse_version(run.output), f"{tool} --version"
            break
        except ParseError:
            tried.append(f"{tool} (log: {run.log_path})")
    if version is None:
        if tried:  # a tool that lists --version but prints no version line is broken, not merely older
            raise TbpwError(f"no `version:` line from {', '.join(tried)}: the build looks broken; rebuild it with "
                            "`tbpw build --force`")
        # No tool of this tree has --version: the build's own record is all there is.
        version = VersionInfo("unknown", build.build_number, build.build_commit, None, None)
        version_from = "build.json (no tool of this build has --version)"
    devices: list[str] = []
    if "--list-devices" in options.get("llama-bench", ()):
        devices_run = run_tool("llama-bench", ["--list-devices"], log_path=logs / "llama-bench.devices.log",
                               build=build, check=False, timeout=120)
        devices = parse_devices(devices_run.output)
    return ToolFeatures(version=version.version, build_number=version.build_number, commit=version.commit,
                        compiler=version.compiler, target=version.target, options=options,
                        quantize_types=quantize_types, devices=devices, version_from=version_from)


def _log_dir(build: BuildInfo) -> Path:
    preferred = build.root / "logs"
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    from tbpw.files import paths

    fallback = paths.home() / "logs" / f"features-{build.key}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def ensure_tool_features(*options: str, tool: str = "llama-quantize", purpose: str = "",
                         build: BuildInfo | None = None) -> ToolFeatures:
    """Raise a one-line TbpwError unless `tool` of the build has every option in `options`.

    `purpose` completes the sentence "needed for ...", e.g. "the fork's native --target-bpw mode".
    """
    build = build or active_build()
    features = detect(build)
    missing = [opt for opt in options if not features.has(opt, tool)]
    if missing:
        need = f" (needed for {purpose})" if purpose else ""
        hint = ("build the target-bpw fork: `tbpw build --source fork` (or --source PATH to a checkout of it)"
                if {"--target-bpw", "--state-file"} & set(missing)
                else "build a newer llama.cpp: `tbpw build --source PATH` with a recent checkout")
        raise TbpwError(f"{tool} of the active build ({build.source_name}, build {features.build_number}) has no "
                        f"{', '.join(missing)}{need}: {hint}")
    return features
