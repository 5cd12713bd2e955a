"""Everything that turns GeoTIFF scenes into batches: schemas, scenes, sampling, synthetic data."""
