"""The picture a retrain's run carries: imagery, map before, corrections, map after."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import rasterio  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from landcover.data.schema import IGNORE_INDEX, ClassSchema  # noqa: E402
from landcover.studio.tiles import Display  # noqa: E402

MAX_EDGE = 1024  # pixels drawn per side: larger scenes are decimated for the picture


def before_after(
    image: Path,
    before: np.ndarray,
    corrections: np.ndarray,
    after: np.ndarray,
    schema: ClassSchema,
    display: Display | None = None,
) -> plt.Figure:
    """Four panels side by side, class colours from the schema, uncorrected pixels blank; the
    imagery in the page's bands and stretch (`display`)."""
    step = max(1, max(before.shape) // MAX_EDGE)
    display = display or Display.of(image)
    height, width = before.shape
    with rasterio.open(image) as src:  # read decimated: a whole tile's bands never in memory
        pixels = src.read(
            display.rgb, out_shape=(len(display.rgb), -(-height // step), -(-width // step))
        )
    rgb = display.stretched(pixels).transpose(1, 2, 0)
    palette = np.vstack([schema.rgb_palette(), [[255, 255, 255]]]).astype(np.float32) / 255
    corrected = corrections[::step, ::step]
    shown = np.where(corrected == IGNORE_INDEX, len(schema.classes), corrected)
    panels = [
        ("imagery", rgb),
        ("map before", palette[before[::step, ::step]]),
        ("corrections", palette[shown]),
        ("map after", palette[after[::step, ::step]]),
    ]
    figure, axes = plt.subplots(1, 4, figsize=(16, 4.6), constrained_layout=True)
    for axis, (title, picture) in zip(axes, panels, strict=True):
        axis.imshow(picture, interpolation="nearest")
        axis.set_title(title)
        axis.axis("off")
    handles = [
        Patch(color=palette[i], label=info.name)
        for i, info in enumerate(schema.classes)
        if not info.ignore
    ]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    return figure
