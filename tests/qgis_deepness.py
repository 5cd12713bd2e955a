"""Run by Debian's python3 (where PyQGIS lives), not the project's: map a raster with QGIS's
Deepness plugin (its own Segmentor and MapProcessorSegmentation, from ../shared/clients) and a
packaged ONNX model, with every parameter taken from the model's metadata as Deepness's dialog
fills them; save the class image Deepness computes (class number + 1, 0 unclassified) and print
what it read.

    PYTHONPATH=<deepness>/src:<deepness>:<deps> QT_QPA_PLATFORM=offscreen \\
        /usr/bin/python3 tests/qgis_deepness.py model.onnx scene.tif result.npy
"""

import json
import os
import sys

import numpy as np
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer

app = QgsApplication([], False)
app.initQgis()

from deepness.common.channels_mapping import ChannelsMapping, ImageChannelStandaloneBand  # noqa: E402
from deepness.common.processing_overlap import (  # noqa: E402
    ProcessingOverlap,
    ProcessingOverlapOptions,
)
from deepness.common.processing_parameters.map_processing_parameters import (  # noqa: E402
    ProcessedAreaType,
)
from deepness.common.processing_parameters.segmentation_parameters import (  # noqa: E402
    SegmentationParameters,
)
from deepness.processing.map_processor.map_processor_segmentation import (  # noqa: E402
    MapProcessorSegmentation,
)
from deepness.processing.models.segmentor import Segmentor  # noqa: E402

onnx_path, raster, result_path = sys.argv[1:4]
layer = QgsRasterLayer(raster, "scene")
if not layer.isValid():
    sys.exit(f"QGIS cannot open {raster}: {layer.error().summary()}")
QgsProject.instance().addMapLayer(layer)
model = Segmentor(onnx_path)
bands = model.get_number_of_channels()
mapping = ChannelsMapping()  # as Deepness's channel widget sets it for a layer: band i -> input i
mapping.set_image_channels(
    [ImageChannelStandaloneBand(band_number=b + 1, name=f"band {b + 1}") for b in range(bands)]
)
mapping.set_number_of_model_inputs_same_as_image_channels()
params = SegmentationParameters(
    resolution_cm_per_px=model.get_metadata_resolution(),
    tile_size_px=model.get_metadata_tile_size(),
    batch_size=1,
    local_cache=False,
    processed_area_type=ProcessedAreaType.ENTIRE_LAYER,
    mask_layer_id=None,
    input_layer_id=layer.id(),
    input_channels_mapping=mapping,
    postprocessing_dilate_erode_size=model.get_metadata_segmentation_small_segment(),
    processing_overlap=ProcessingOverlap(
        ProcessingOverlapOptions.OVERLAP_IN_PERCENT, percentage=model.get_metadata_tiles_overlap()
    ),
    pixel_classification__probability_threshold=model.get_metadata_segmentation_threshold(),
    model=model,
)
processor = MapProcessorSegmentation(rlayer=layer, vlayer_mask=None, map_canvas=None, params=params)
outcome = processor.run()
result = np.asarray(processor.get_result_img())
np.save(result_path, result)
print(
    json.dumps(
        {
            "ok": bool(outcome),
            "class_names": [
                model.get_channel_name(0, c)
                for c in range(model.get_number_of_output_channels()[0])
            ],
            "tile": params.tile_size_px,
            "overlap_px": params.processing_overlap_px,
            "resolution_cm": params.resolution_cm_per_px,
            "shape": list(result.shape),
        }
    )
)
sys.stdout.flush()
os._exit(0)  # QGIS 3.22's exitQgis() crashes offscreen after the work is done
