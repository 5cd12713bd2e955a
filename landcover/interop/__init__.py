"""Bridges to other runtimes and formats: ONNX export and files, the 2018 CNTK models."""
