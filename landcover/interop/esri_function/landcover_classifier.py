"""A landcover model in ArcGIS Pro: the child of Esri's `ImageClassifier.py` raster function
("Classify Pixels Using Deep Learning") that the package's `.emd` names (Framework `ONNX`,
ModelConfiguration `landcover_classifier`), as the 2018 tutorial's network was deployed.

Shipped inside the `.dlpk` and run by ArcGIS's Python: numpy and ONNX Runtime only, nothing of
landcover. ArcGIS hands each block padded by `ModelPadding` on every side; past the raster's edge
it has no data (the mask is 0 there). Those pixels are filled by mirroring the raster's own
(numpy's "symmetric"), as `landcover-predict` pads a scene's edge, so that the classes agree
with it to the edge; the graph answers the block (less the network's own margin, which it cuts),
and what is left of the padding is cut here.
"""

import json
import os

import numpy as np


def mirror_outside(pixels, mask):
    """`pixels` (bands, rows, cols) with the rows and columns where `mask` is 0 all along
    (past the raster's edge) replaced by the valid block mirrored outward."""
    if mask is None:
        return pixels
    valid = np.asarray(mask) != 0
    if valid.ndim == 3:
        valid = valid.all(axis=0)
    rows = np.flatnonzero(valid.any(axis=1))
    cols = np.flatnonzero(valid.any(axis=0))
    if not len(rows) or not len(cols):
        return pixels
    top, bottom = rows[0], rows[-1] + 1
    left, right = cols[0], cols[-1] + 1
    inside = pixels[:, top:bottom, left:right]
    pads = ((0, 0), (top, pixels.shape[1] - bottom), (left, pixels.shape[2] - right))
    return np.pad(inside, pads, mode="symmetric")


class ChildImageClassifier:
    """Called by ImageClassifier: initialize, getParameterInfo, getConfiguration, then
    updatePixels for each block."""

    def initialize(self, model, model_as_file):
        """Read the .emd (a path or its JSON text) and open the graph it names."""
        import onnxruntime as ort

        if model_as_file:
            with open(model) as f:
                self.json_info = json.load(f)
            base = os.path.dirname(os.path.abspath(model))
        else:
            self.json_info = json.loads(model)
            base = os.getcwd()
        path = self.json_info["ModelFile"]
        if not os.path.isabs(path):
            path = os.path.join(base, path)
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.codes = np.array([c["Value"] for c in self.json_info["Classes"]], dtype=np.int32)
        self.tile = int(self.json_info["ImageHeight"])
        self.padding = int(self.json_info["ModelPadding"])

    def getParameterInfo(self, required_parameters):  # noqa: N802 - ArcGIS's name
        """No parameters beyond ImageClassifier's: the .emd fixes tile, padding and batch."""
        return required_parameters

    def getConfiguration(self, **scalars):  # noqa: N802 - ArcGIS's name
        """Blocks of the graph's tile less its padding, padded by ArcGIS on every side."""
        inner = self.tile - 2 * self.padding
        return {
            "extractBands": tuple(self.json_info["ExtractBands"]),
            "padding": self.padding,
            "tx": inner,
            "ty": inner,
            "fixedTileSize": 1,
        }

    def updatePixels(self, tlc, shape, props, **pixelBlocks):  # noqa: N802, N803 - ArcGIS's
        """The class codes of one padded block (its padding cut)."""
        pixels = np.asarray(pixelBlocks["raster_pixels"], dtype=np.float32)
        pixels = mirror_outside(pixels, pixelBlocks.get("raster_mask"))
        probabilities = self.session.run(None, {"pixels": pixels[None]})[0][0]
        p = self.padding - (pixels.shape[1] - probabilities.shape[1]) // 2  # margin cut inside
        classes = probabilities[:, p : probabilities.shape[1] - p, p : probabilities.shape[2] - p]
        return self.codes[classes.argmax(axis=0)][None]
