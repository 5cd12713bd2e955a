"""Bounds on a stored model's description, checked before anything is built or allocated.

A model file's metadata says how large a network to build and how many bands to read:
`bands: 3000000` once made `landcover-predict` allocate 7.9 GB before failing, an unknown
architecture ended in a ValueError traceback, a missing one in a KeyError, and an encoder name
with a hub prefix made timm reach for the network. Every loader of stored models (logged
models, checkpoints) passes the metadata through `check_stored_model` first: values outside
what this project ever writes are one error naming the file and the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from landcover.errors import LandcoverError

MAX_BANDS = 64  # NAIP has 4; multispectral stacks stay far below
MAX_CLASSES = 255  # class maps are uint8 with 255 left for nodata
MAX_DECODER_WIDTH = 4096
MAX_MARGIN = 1024
OUR_ARCHS = ("seed", "pixel_gbm")


class StoredModelError(LandcoverError):
    """A stored model whose description is out of bounds or names unknown code."""


def check_stored_model(metadata: Any, model_config: Any, source: str) -> None:
    """Raise StoredModelError unless `metadata` and its `model_config` are within bounds."""
    if not isinstance(metadata, Mapping):
        raise StoredModelError(f"{source}: model metadata is not a mapping")

    def fail(key: str, problem: str) -> StoredModelError:
        return StoredModelError(f"{source}: model metadata {key} {problem}")

    bands = metadata.get("bands")
    if not isinstance(bands, int) or isinstance(bands, bool) or not 1 <= bands <= MAX_BANDS:
        raise fail("bands", f"= {bands!r}: a whole number from 1 to {MAX_BANDS}")
    schema = metadata.get("schema")
    classes = schema.get("classes") if isinstance(schema, Mapping) else None
    if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES:
        raise fail("schema.classes", f"must list 1 to {MAX_CLASSES} classes")
    normalize = metadata.get("normalize")
    if not isinstance(normalize, Mapping):
        raise fail("normalize", "is missing")
    for key in ("mean", "std"):
        values = normalize.get(key)
        if (
            not isinstance(values, list | tuple)
            or len(values) != bands
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in values)
        ):
            raise fail(f"normalize.{key}", f"must be {bands} finite numbers (one per band)")
    if any(v <= 0 for v in normalize["std"]):
        raise fail("normalize.std", "must be positive")
    margin = metadata.get("output_margin", 0)
    if not isinstance(margin, int) or not 0 <= margin <= MAX_MARGIN:
        raise fail("output_margin", f"= {margin!r}: 0 to {MAX_MARGIN}")
    check_model_config(model_config, source)


def check_model_config(config: Any, source: str) -> None:
    """The architecture and encoder must be ones this package builds from its own code, with
    no download (names with a hub prefix are refused), and sizes within bounds."""
    if not isinstance(config, Mapping):
        raise StoredModelError(f"{source}: the stored model config is not a mapping")
    arch = config.get("arch")
    if not isinstance(arch, str) or not arch:
        raise StoredModelError(f"{source}: the stored model config names no architecture (arch)")
    if arch in OUR_ARCHS:
        return
    import segmentation_models_pytorch as smp

    known = sorted(smp.MODEL_ARCHITECTURES_MAPPING)
    if arch.lower() not in known:
        raise StoredModelError(
            f"{source}: unknown architecture arch={arch!r} (known: {', '.join(OUR_ARCHS)}, "
            f"{', '.join(known)})"
        )
    encoder = config.get("encoder_name", "resnet34")
    if not isinstance(encoder, str) or encoder not in smp.encoders.encoders:
        timm_name = encoder.removeprefix("tu-") if isinstance(encoder, str) else ""
        if not (isinstance(encoder, str) and encoder.startswith("tu-") and _timm_knows(timm_name)):
            raise StoredModelError(
                f"{source}: encoder_name={encoder!r} is not an encoder this package builds "
                "without a download (smp's encoders, or tu-<timm model>; no hub prefixes)"
            )
    depth = config.get("encoder_depth", 5)
    if not isinstance(depth, int) or not 1 <= depth <= 5:
        raise StoredModelError(f"{source}: encoder_depth={depth!r}: 1 to 5")
    widths = config.get("decoder_channels")
    if widths is not None and (
        not isinstance(widths, list | tuple)
        or not all(isinstance(w, int) and 1 <= w <= MAX_DECODER_WIDTH for w in widths)
    ):
        raise StoredModelError(
            f"{source}: decoder_channels={widths!r}: whole numbers from 1 to {MAX_DECODER_WIDTH}"
        )


def _timm_knows(name: str) -> bool:
    if ":" in name or "/" in name:  # hf-hub:org/model and the like fetch from the network
        return False
    import timm

    return name in timm.list_models()
