"""Drive Esri's ImageClassifier.py as ArcGIS Pro drives a Python raster function."""

import importlib
import json
import sys
import zipfile
from pathlib import Path

import numpy as np


def classify_with_arcgis(dlpk: Path, scene: np.ndarray, functions: Path, work: Path):
    """`scene` (bands, rows, cols): the class codes ArcGIS's ImageClassifier gives it, and the
    raster attribute table it declares."""
    folder = work / "dlpk"
    with zipfile.ZipFile(dlpk) as pack:
        pack.extractall(folder)
    emd = next(folder.glob("*.emd"))
    for path in (str(functions), str(folder)):
        if path not in sys.path:
            sys.path.insert(0, path)
    classifier = importlib.import_module("ImageClassifier").ImageClassifier()
    classifier.initialize(model=str(emd))
    classifier.getParameterInfo()
    config = classifier.getConfiguration()
    info = classifier.updateRasterInfo(output_info={})
    table = json.loads(info["output_info"]["rasterAttributeTable"])
    pad, tx, ty = config["padding"], config["tx"], config["ty"]
    bands, rows, cols = scene.shape
    out = np.zeros((rows, cols), np.int32)
    for top in range(0, rows, ty):
        for left in range(0, cols, tx):
            block = np.zeros((bands, ty + 2 * pad, tx + 2 * pad), scene.dtype)
            mask = np.zeros(block.shape, np.uint8)
            r0, r1 = top - pad, top + ty + pad
            c0, c1 = left - pad, left + tx + pad
            sr0, sr1, sc0, sc1 = max(r0, 0), min(r1, rows), max(c0, 0), min(c1, cols)
            block[:, sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0] = scene[:, sr0:sr1, sc0:sc1]
            mask[:, sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0] = 1
            blocks = {"raster_pixels": block, "raster_mask": mask}
            result = classifier.updatePixels((left, top), (ty, tx), {"pixelType": "i4"}, **blocks)
            part = result["output_pixels"][0]
            h, w = min(ty, rows - top), min(tx, cols - left)
            out[top : top + h, left : left + w] = part[:h, :w]
    return out, table
