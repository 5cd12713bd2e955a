"""Map whole scenes: model references, tiled prediction, stitching, GeoTIFF/COG writing."""
