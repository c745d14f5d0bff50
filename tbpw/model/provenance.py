"""What a GGUF written by tbpw records about how it was made: `tbpw.*` string keys in its metadata.

tbpw writes them with llama-quantize's `--override-kv KEY=str:VALUE` (tbpw.llamacpp.quantize), so stock tools
read the file as usual: llama.cpp ignores keys it does not know. llama-quantize (b11312) keeps a key and a
string value in 128-byte buffers and, given a longer one, prints its usage and exits 1 without saying why; so
every key and value here fits in 127 bytes: free text is cut at a character boundary, a JSON value too long
for that is replaced by its sha256.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

PREFIX = "tbpw."
MAX_BYTES = 127

# field -> what it says, in the order `tbpw inspect` shows them
FIELDS: dict[str, str] = {
    "version": "tbpw version",
    "llama_cpp": "llama.cpp build",
    "target": "target",
    "allocator": "allocator",
    "allocator_options": "allocator options",
    "metric": "error metric",
    "recipe_sha256": "recipe (sha256 of its resolved content)",
    "imatrix_sha256": "imatrix (sha256)",
    "calibration": "calibration data",
    "calibration_sha256": "calibration data (sha256)",
}


def clip(text: str) -> str:
    """`text` cut to MAX_BYTES of UTF-8 without splitting a character."""
    return text.encode("utf-8")[:MAX_BYTES].decode("utf-8", errors="ignore")


def compact_json(value: Any) -> str:
    """`value` as compact JSON, or `sha256:<hex>` of that JSON when it is longer than a value may be."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return text if len(text.encode()) <= MAX_BYTES else "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def record(**values: str) -> dict[str, str]:
    """The `tbpw.*` keys of these fields (empty ones left out), each value cut to what llama-quantize takes."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"no provenance field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
    return {PREFIX + name: clip(value) for name, value in values.items() if value}


def read(fields: Mapping[str, Any]) -> dict[str, str]:
    """The provenance fields a GGUF's metadata holds (field -> value), in FIELDS order, unknown `tbpw.*` keys last."""
    found = {key[len(PREFIX):]: str(value) for key, value in fields.items() if key.startswith(PREFIX)}
    return {**{name: found[name] for name in FIELDS if name in found},
            **{name: value for name, value in sorted(found.items()) if name not in FIELDS}}
