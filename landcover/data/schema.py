"""Class schemas: how raw label codes in a raster become training classes.

Label products use their own codes (Chesapeake: 1 water ... 6 road, 15 no data) while a model
is trained on a small contiguous set of classes. A schema is the single place that mapping
lives, so training, metrics, figures and written maps all agree on names and colours.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = 255
"""Target value for pixels that count in neither loss nor metrics (nodata, ignored classes)."""


@dataclass(frozen=True)
class ClassInfo:
    """One training class: its name, display colour and the raw codes it collects."""

    name: str
    color: str
    codes: tuple[int, ...]
    ignore: bool = False
    """An ignored class keeps its output channel (e.g. the 2018 tutorial's class 0, "no data")
    but its pixels are never a training target and are left out of the metrics."""


@dataclass(frozen=True)
class ClassSchema:
    """Label raster codes to training classes and back: what makes the same model usable with any
    label product."""

    name: str
    classes: tuple[ClassInfo, ...]
    ignore_codes: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        seen: dict[int, str] = {}
        for info in self.classes:
            for code in info.codes:
                if code in seen:
                    raise ValueError(
                        f"class schema {self.name!r}: code {code} is claimed by both "
                        f"{seen[code]!r} and {info.name!r}"
                    )
                seen[code] = info.name
        for code in self.ignore_codes:
            if code in seen:
                raise ValueError(
                    f"class schema {self.name!r}: code {code} is both ignored and "
                    f"mapped to class {seen[code]!r}"
                )
        for code in (*seen, *self.ignore_codes):
            if not 0 <= code <= 255:
                raise ValueError(f"class schema {self.name!r}: code {code} is not a uint8 value")

    @classmethod
    def from_config(cls, cfg: Mapping) -> ClassSchema:
        """The schema from its YAML form (conf/data/schema/), checked for overlapping codes."""
        classes = tuple(
            ClassInfo(
                name=str(c["name"]),
                color=str(c["color"]),
                codes=tuple(int(v) for v in c["codes"]),
                ignore=bool(c.get("ignore", False)),
            )
            for c in cfg["classes"]
        )
        return cls(
            name=str(cfg["name"]),
            classes=classes,
            ignore_codes=tuple(int(v) for v in cfg.get("ignore_codes", ()) or ()),
        )

    def to_dict(self) -> dict:
        """Plain form that travels with a logged model (JSON-safe)."""
        return {
            "name": self.name,
            "classes": [
                {"name": c.name, "color": c.color, "codes": list(c.codes), "ignore": c.ignore}
                for c in self.classes
            ],
            "ignore_codes": list(self.ignore_codes),
        }

    @property
    def num_classes(self) -> int:
        """Output channels of a model trained with this schema."""
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        """Class names in output-channel order (metric and figure labels)."""
        return [c.name for c in self.classes]

    @property
    def scored_classes(self) -> list[int]:
        """Indices of classes that metrics report (ignored classes excluded)."""
        return [i for i, c in enumerate(self.classes) if not c.ignore]

    @property
    def known_codes(self) -> set[int]:
        """Every raster code the schema maps or ignores (any other is an error)."""
        return {code for c in self.classes for code in c.codes} | set(self.ignore_codes)

    def lookup_table(self) -> np.ndarray:
        """256-entry table: raw code -> class index, IGNORE_INDEX for ignored or unknown codes."""
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        for index, info in enumerate(self.classes):
            if not info.ignore:
                lut[list(info.codes)] = index
        return lut

    def unknown_codes(self, codes: Iterable[int]) -> list[int]:
        """The codes in `values` the schema does not know, for an error that names them."""
        known = self.known_codes
        return sorted(int(c) for c in codes if int(c) not in known)

    def rgb_palette(self) -> np.ndarray:
        """(num_classes, 3) uint8 colours for figures."""
        return np.array([hex_to_rgb(c.color) for c in self.classes], dtype=np.uint8)

    def class_indices(self, names: Sequence[str]) -> list[int]:
        """Label codes -> class indices (ignored codes -> IGNORE_INDEX) through one lookup table."""
        index = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(
                f"class schema {self.name!r} has no class named {missing}; classes are {self.names}"
            )
        return [index[n] for n in names]


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    """`#rrggbb` -> (r, g, b) for GeoTIFF colour maps and figures."""
    text = color.lstrip("#")
    if len(text) != 6:
        raise ValueError(f"colour {color!r} is not of the form #rrggbb")
    return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)
