"""Bridges to other runtimes and formats: ONNX export, (later) CNTK model import."""
