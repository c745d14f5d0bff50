"""Where tbpw keeps what it downloads and builds: always outside the repository."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tbpw.errors import TbpwError


def home() -> Path:
    """The cache root: $TBPW_HOME, else $XDG_CACHE_HOME/tbpw, else ~/.cache/tbpw."""
    if env := os.environ.get("TBPW_HOME"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "tbpw"


def downloads() -> Path:
    return home() / "downloads"


def sources() -> Path:
    return home() / "sources"


def builds() -> Path:
    return home() / "builds"


def assets() -> Path:
    return home() / "assets"


def measure_cache() -> Path:
    """Error tables: $TBPW_MEASURE_CACHE, else <home>/measure (they can be large for big models)."""
    env = os.environ.get("TBPW_MEASURE_CACHE")
    return Path(env).expanduser() if env else home() / "measure"


def sensitivity_cache() -> Path:
    """Measured sensitivities (tbpw.select.calibrate): $TBPW_SENSITIVITY_CACHE, else <home>/sensitivity."""
    env = os.environ.get("TBPW_SENSITIVITY_CACHE")
    return Path(env).expanduser() if env else home() / "sensitivity"


def calibration_cache() -> Path:
    """Float-model logits on calibration text and the KLD scores of plans against them (tbpw.select.scoring):
    $TBPW_CALIBRATION_CACHE, else <home>/calibration."""
    env = os.environ.get("TBPW_CALIBRATION_CACHE")
    return Path(env).expanduser() if env else home() / "calibration"


def vendor_dir() -> Path:
    """The pins and tbpw's own native sources: $TBPW_VENDOR, else the repository's vendor/ folder, which
    installs as the data package `tbpw_vendor` (a checkout and a wheel find it the same way)."""
    if env := os.environ.get("TBPW_VENDOR"):
        return Path(env)
    spec = importlib.util.find_spec("tbpw_vendor")
    if spec is None or not spec.submodule_search_locations:
        raise TbpwError("tbpw's vendor data (tbpw_vendor) is not installed: reinstall tbpw, or set TBPW_VENDOR "
                        "to the vendor/ folder of a tbpw checkout")
    return Path(next(iter(spec.submodule_search_locations)))
