"""Mapping jobs: many rasters, one model, resumable, on this machine or a Ray cluster."""
