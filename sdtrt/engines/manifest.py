"""engines.json: what was built, from what, with which library, for which GPUs.

The runtime trusts nothing else: without a GPU an engine cannot even be deserialized, so every
fact sdtrt states about an engine (inspect, compatibility checks, profile ranges) comes from here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import SdtrtError

MANIFEST = "engines.json"
FORMAT = "sdtrt-engines"
FORMAT_VERSION = 1


def cache_key(onnx_sha256: str, shapes: dict, options: dict, module: str, version: str) -> str:
    """Same ONNX + profile + build options + library version + targets -> same key -> no rebuild."""
    payload = json.dumps({"onnx": onnx_sha256, "shapes": shapes, "options": options, "module": module, "version": version},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def read(engine_dir: Path) -> dict[str, Any]:
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise SdtrtError(f"{engine_dir} has no {MANIFEST}: it is not an sdtrt engine directory.",
                         "build one with `sdtrt build ONNX_DIR --out ENGINE_DIR`")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise SdtrtError(f"{path} is not a version-{FORMAT_VERSION} sdtrt engine manifest.", "rebuild with this sdtrt: `sdtrt build ONNX_DIR --out ENGINE_DIR --force`")
    return data
