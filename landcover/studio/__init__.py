"""The correction studio: a person looks at a scene and its map, paints corrections, and the
model learns them in seconds; every correction is tracked data and every retrain a run.

- `session`: one scene under correction (image, model versions, their maps, state on disk)
- `edits`: the append-only edit log (GeoPackage) and the label raster it implies
- `head`, `adapt`: the network's last layer taken apart and refitted on the corrections
- `retrain`: a retrain as an MLflow run (start model, corrections dataset, logged model)
- `tiles`, `app`, `access`, `static/`: the page, its tiles, and who may open it
- `figures`: the before/after picture a retrain's run carries
"""
