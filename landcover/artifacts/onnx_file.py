"""Reading an exported ONNX file: its runtime session and the landcover metadata inside it.

Apart from the export (`landcover.interop.onnx`) because reading needs no PyTorch: a mapping
process given an `.onnx` file never imports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from landcover.errors import LandcoverError

METADATA_KEY = "landcover"


def load_onnx(path: Path) -> tuple[Any, dict[str, Any]]:
    """An onnxruntime session and the landcover metadata stored in the file."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=ort.get_available_providers())
    except Exception as err:  # onnxruntime raises its own exception types
        raise LandcoverError(f"{path}: not a loadable ONNX model ({err})") from err
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise LandcoverError(f"{path}: ONNX model was not exported by landcover (no metadata)")
    return session, json.loads(props[METADATA_KEY])
