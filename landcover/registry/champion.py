"""`landcover-champion`: the champion's history, putting a past champion back, and the GIS
package every champion carries.

    landcover-champion                                  # the history, oldest first
    landcover-champion action=restore to=previous reason="v7 misses roads"
    landcover-champion action=restore to=3

Moving the alias (here or in `landcover-promote`) packages the new champion for QGIS, ArcGIS
Pro and STAC (`landcover-package`) and logs the package with the version's run under `gis/`,
so the registry always holds a GIS-ready champion and the MLflow UI shows it beside the model.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from landcover.errors import ConfigError, LandcoverError, first_line
from landcover.registry.history import entries
from landcover.registry.promotion import PACKAGE_ARTIFACTS, PACKAGE_TAG, Promotion
from landcover.registry.restore import restore

log = logging.getLogger("landcover.champion")
PACKAGE_ERROR_TAG = "landcover.package_error"


def package_version(tracking_uri: str | None, name: str, version: str) -> str:
    """Package `models:/<name>/<version>` and log it with its run under `gis/`; the version's
    `landcover.package` tag names where. Returns that artifact URI."""
    from landcover.interop.package import package_model

    client = MlflowClient(tracking_uri)
    run_id = str(client.get_model_version(name, version).run_id)
    with tempfile.TemporaryDirectory(prefix="landcover-package-") as folder:
        package_model(
            f"models:/{name}/{version}", Path(folder), tracking_uri=tracking_uri, name=name
        )
        client.log_artifacts(run_id, folder, PACKAGE_ARTIFACTS)
    where = f"runs:/{run_id}/{PACKAGE_ARTIFACTS}"
    client.set_model_version_tag(name, version, PACKAGE_TAG, where)
    log.info("%s version %s packaged for QGIS, ArcGIS Pro and STAC: %s", name, version, where)
    return where


def package_if_moved(cfg: DictConfig, result: Promotion) -> None:
    """After a move of the alias (outside the registry lock: packaging takes a while), unless
    `package=false` or the version already carries its package."""
    moved = result.champion and result.previous_version != result.version
    if not (bool(cfg.package) and moved):
        return
    client = MlflowClient(cfg.tracking.uri)
    if client.get_model_version(result.name, result.version).tags.get(PACKAGE_TAG):
        return
    try:
        package_version(cfg.tracking.uri, result.name, result.version)
    except LandcoverError as err:  # the alias moved: a package that cannot be made is a warning
        reason = first_line(err)
        client.set_model_version_tag(result.name, result.version, PACKAGE_ERROR_TAG, reason)
        log.warning(
            "%s version %s is %s but was not packaged for GIS tools: %s",
            result.name, result.version, cfg.registry.alias, reason,
        )  # fmt: skip


def run_champion(cfg: DictConfig) -> Promotion | None:
    """`landcover-champion`: `action=history` prints the decisions; `action=restore` moves the
    alias back."""
    client = MlflowClient(cfg.tracking.uri)
    name = str(cfg.registry.name)
    if cfg.action == "history":
        found = [e for e in entries(client, name) if e.alias == cfg.registry.alias]
        if not found:
            print(f"no decision recorded for {name}@{cfg.registry.alias} yet")
        for entry in found:
            print(entry.line())
        return None
    if cfg.action != "restore":
        raise ConfigError(f"action={cfg.action!r} is not one of history, restore")
    if not cfg.to:
        raise ConfigError("action=restore needs to=previous or to=<version>")
    result = restore(
        client,
        name=name,
        to=str(cfg.to),
        metric=str(cfg.metric),
        alias=str(cfg.registry.alias),
        previous_alias=str(cfg.registry.previous_alias),
        reason=str(cfg.reason or ""),
        force=bool(cfg.force),
    )
    log.info("%s; aliases %s", result.reason, result.aliases)
    package_if_moved(cfg, result)
    return result
