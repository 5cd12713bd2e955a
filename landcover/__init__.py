"""landcover: pixel-level land cover classification of aerial imagery, with every run recorded."""

__version__ = "0.1.0"
