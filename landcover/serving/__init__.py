"""Serving: a logged model answering REST requests with class codes.

This package's name is the `loader_module` every landcover MLmodel file records (models logged
before the package had wings included), so MLflow's pyfunc loader calls `_load_pyfunc` here.
The face itself is `serving.pyfunc`, the command `serving.server` (`landcover-serve`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from landcover.serving.pyfunc import ClassMapModel, class_map_model


def _load_pyfunc(path: str, model_config: Mapping[str, Any] | None = None) -> ClassMapModel:
    """MLflow's pyfunc entry point: the name its loader looks for in a `loader_module`."""
    return class_map_model(path, model_config)
