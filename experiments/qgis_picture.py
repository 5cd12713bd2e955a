"""The picture in docs/gis.md: what QGIS shows once Deepness has mapped a scene with a package
from `landcover-package`: the imagery and the class layer in the package's QML style, rendered
by QGIS itself (offscreen). Run by Debian's python3, where PyQGIS lives:

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 experiments/qgis_picture.py \\
        scene.tif deepness.npy model.qml docs/images/qgis_deepness.png

`deepness.npy`: the class raster Deepness computed (tests/qgis_deepness.py saves it), on the
scene's grid.
"""

import os
import sys
import tempfile

import numpy as np
from osgeo import gdal
from qgis.core import (
    QgsApplication,
    QgsMapRendererParallelJob,
    QgsMapSettings,
    QgsMultiBandColorRenderer,
    QgsRasterLayer,
)
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor, QImage, QPainter

app = QgsApplication([], False)
app.initQgis()
scene, classes_npy, qml, png = sys.argv[1:5]


def render(layer: QgsRasterLayer, size: int) -> QImage:
    settings = QgsMapSettings()
    settings.setLayers([layer])
    settings.setExtent(layer.extent())
    settings.setOutputSize(QSize(size, size))
    settings.setBackgroundColor(QColor(255, 255, 255))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    return job.renderedImage()


source = gdal.Open(scene)
numbers = np.load(classes_npy)[0].astype(np.uint8)
work = tempfile.mkdtemp()
layer_path = os.path.join(work, "deepness_classes.tif")
out = gdal.GetDriverByName("GTiff").Create(layer_path, numbers.shape[1], numbers.shape[0], 1, 1)
out.SetGeoTransform(source.GetGeoTransform())
out.SetProjection(source.GetProjection())
out.GetRasterBand(1).WriteArray(numbers)
out = None

imagery = QgsRasterLayer(scene, "imagery")
imagery.setRenderer(QgsMultiBandColorRenderer(imagery.dataProvider(), 1, 2, 3))
classes = QgsRasterLayer(layer_path, "Deepness")
message, loaded = classes.loadNamedStyle(qml)
if not loaded:
    sys.exit(f"QGIS did not load {qml}: {message}")
size = 384
left, right = render(imagery, size), render(classes, size)
picture = QImage(2 * size + 8, size, QImage.Format_RGB32)
picture.fill(QColor(255, 255, 255))
painter = QPainter(picture)
painter.drawImage(0, 0, left)
painter.drawImage(size + 8, 0, right)
painter.end()
picture.save(png, "png")
print([label for label, _ in classes.renderer().legendSymbologyItems()])
sys.stdout.flush()
os._exit(0)  # QGIS 3.22's exitQgis() crashes offscreen after the work is done
