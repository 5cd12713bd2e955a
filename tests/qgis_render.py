"""Run by Debian's python3 (where PyQGIS lives), not the project's: open a raster in QGIS
offscreen with its default style (the `.qml` beside it), render it to PNG and print the legend.

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis_render.py map.tif out.png
"""

import json
import os
import sys

from qgis.core import QgsApplication, QgsMapRendererParallelJob, QgsMapSettings, QgsRasterLayer
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor

app = QgsApplication([], False)
app.initQgis()
raster, png = sys.argv[1], sys.argv[2]
layer = QgsRasterLayer(raster, "map")
if not layer.isValid():
    sys.exit(f"QGIS cannot open {raster}: {layer.error().summary()}")
message, loaded = layer.loadDefaultStyle()
settings = QgsMapSettings()
settings.setLayers([layer])
settings.setExtent(layer.extent())
settings.setOutputSize(QSize(128, 128))
settings.setBackgroundColor(QColor(255, 255, 255))
job = QgsMapRendererParallelJob(settings)
job.start()
job.waitForFinished()
job.renderedImage().save(png, "png")
legend = [(label, color.name()) for label, color in layer.renderer().legendSymbologyItems()]
print(
    json.dumps(
        {"style": loaded, "message": message, "renderer": layer.renderer().type(), "legend": legend}
    )
)
sys.stdout.flush()
os._exit(0)  # QGIS 3.22's exitQgis() crashes offscreen (SIGSEGV) after the work is done
