"""What a mapping job maps: paths, globs, lists, text files of paths/URLs, or STAC items.

Remote hrefs (`http(s)://`, `s3://`, `/vsi...`) stay strings: GDAL reads them through its
virtual filesystems with range requests, never downloading a whole file first.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from landcover.data.scenes import is_remote
from landcover.errors import ConfigError

STAC_IMAGE_ROLES = ("data", "visual")


@dataclass(frozen=True)
class MapInput:
    """One raster to map: where GDAL reads it, and the name its outputs take."""

    source: str
    name: str  # output stem: <name>_landcover.tif

    @classmethod
    def of(cls, source: str, name: str | None = None) -> MapInput:
        """An input named after its file (a URL's last path segment)."""
        stem = Path(urlparse(source).path if is_remote(source) else source).stem
        return cls(source, name or utf8_name(stem))


def utf8_name(name: str) -> str:
    """A name for outputs that GDAL and MLflow can take: bytes of a file name that are not
    UTF-8 (kept by Python as surrogates) written as %XX."""
    raw = name.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(
            f"%{ord(char) - 0xDC00:02X}" if 0xDC80 <= ord(char) <= 0xDCFF else char for char in name
        )


shown = utf8_name  # a path as logs and records show it (what is not UTF-8 as %XX)


def expand(spec: str | Sequence[str], asset: str | None = None) -> list[MapInput]:
    """Every input the spec names, in a stable order, duplicates dropped; none is an error.

    `spec`: a raster, a glob, a list of either, a `.txt` file with one path or URL per line
    (`#` comments), or a STAC ItemCollection / Item / static catalog JSON (`asset` picks the
    asset key; by default the first asset whose roles include `data`).
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    found: list[MapInput] = []
    for item in items:
        found += _expand_one(str(item), asset)
    unique = list(dict.fromkeys(found))
    if not unique:
        raise ConfigError(f"config value input={spec!r} matches no raster")
    names = [i.name for i in unique]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"inputs share names {repeated[:5]}: map them to separate outputs")
    return unique


def _expand_one(item: str, asset: str | None) -> list[MapInput]:
    if is_remote(item):
        return [MapInput.of(item)]
    path = Path(item)
    if path.suffix == ".txt" and path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines()]
        return [
            x
            for line in lines
            if line and not line.startswith("#")
            for x in _expand_one(line, asset)
        ]
    if path.suffix == ".json" and path.is_file():
        return stac_inputs(path, asset)
    if glob.has_magic(item):
        return [MapInput.of(p) for p in sorted(glob.glob(item))]
    if not path.exists():
        raise ConfigError(f"config value input: {item} does not exist")
    return [MapInput.of(str(path))]


def stac_inputs(path: Path, asset: str | None) -> list[MapInput]:
    """The chosen asset of every item of a STAC ItemCollection, Item or static catalog."""
    import pystac

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not readable STAC JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a JSON {type(data).__name__}, not a STAC ItemCollection, Item or catalog "
            "(each is a JSON object)"
        )
    kind = data.get("type")
    try:
        if kind == "FeatureCollection":
            items = list(pystac.ItemCollection.from_dict(data, preserve_dict=False))
        elif kind == "Feature":
            items = [pystac.Item.from_file(str(path))]
        else:  # Catalog or Collection: walk it
            catalog = pystac.read_file(str(path))
            if not isinstance(catalog, pystac.Catalog):
                raise ValueError(f"a {type(catalog).__name__}, not a catalog")
            items = list(catalog.get_items(recursive=True))
    except Exception as err:  # pystac raises many kinds for a malformed document
        raise ConfigError(f"{path}: not a STAC ItemCollection, Item or catalog ({err})") from err
    return [MapInput(_asset_href(item, asset, path), item.id) for item in items]


def _asset_href(item: object, asset: str | None, path: Path) -> str:
    assets = item.assets  # type: ignore[attr-defined]
    if asset is not None:
        if asset not in assets:
            raise ConfigError(
                f"{path}: item {item.id} has no asset {asset!r} (it has {sorted(assets)})"  # type: ignore[attr-defined]
            )
        chosen = assets[asset]
    else:
        by_role = [a for a in assets.values() if set(a.roles or []) & set(STAC_IMAGE_ROLES)]
        if not by_role:
            raise ConfigError(
                f"{path}: item {item.id} has no data asset; choose one with asset=<key> "  # type: ignore[attr-defined]
                f"({sorted(assets)})"
            )
        chosen = by_role[0]
    href = chosen.get_absolute_href() or chosen.href
    if href.startswith("file://"):
        href = urlparse(href).path
    return href
