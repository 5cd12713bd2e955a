"""Fusing a co-registered low-resolution land cover layer (NLCD) into a model's probabilities.

The Chesapeake Land Cover dataset pairs every NAIP tile with NLCD 2011 (30 m classes on the 1 m
grid; Robinson et al., CVPR 2019, "multi-resolution data"), and NLCD covers the whole United
States. Its legend says what a class means in the classes we map: "Developed, Low Intensity" is
20-49 % impervious, "Open Water" at least 75 % water. A network that sees only pixels misses
narrow roads under tree shadow; the layer knows the cell is developed. With the image and the
layer independent given the class, Bayes' rule gives

    p(c | image, layer) ∝ p(c | image) · p(c | layer code) / p_ref(c)

where p_ref is the prior the network already carries (its training data's class shares): a
code whose legend says nothing leaves the network's probabilities alone. The table comes from
the legend, not from any labels here, so nothing in it is fitted to a split (issue 16's guard).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import OmegaConf

from landcover.data.schema import ClassSchema
from landcover.errors import ConfigValueError
from landcover.paths import CONFIG_DIR

if TYPE_CHECKING:
    from landcover.artifacts.reference import LoadedModel

CODES = 256  # the layer is uint8


@dataclass(frozen=True)
class PriorLayer:
    """What each code of a uint8 layer says about the classes, as one probability factor per
    (code, class): the tiled predictor multiplies the blended probabilities by it."""

    name: str
    factors: np.ndarray  # (256, classes) float32, 1 where the code says nothing

    @classmethod
    def from_metadata(cls, prior: Mapping[str, Any], schema: ClassSchema) -> PriorLayer:
        """Factors from a table `{name, reference: {class: share}, codes: {code: {class: share}}}`
        (conf/prior/*.yaml, recorded in the model's metadata): the stated classes of a code get
        share / reference, the others share what is left in proportion to their reference."""
        name = str(prior.get("name") or "prior")
        reference = {str(k): float(v) for k, v in dict(prior.get("reference") or {}).items()}
        codes = dict(prior.get("codes") or {})
        names = schema.names
        factors = np.ones((CODES, len(names)), dtype=np.float32)
        for class_name, share in reference.items():
            _check_share(name, f"reference.{class_name}", share, open_interval=True)
            _check_class(name, f"reference.{class_name}", class_name, names)
        for code, stated in codes.items():
            where = f"codes.{code}"
            if not 0 <= int(code) < CODES:
                raise ConfigValueError(f"prior {name}: {where} is not a uint8 layer code")
            stated = {str(k): float(v) for k, v in dict(stated).items()}
            for class_name, share in stated.items():
                _check_share(name, f"{where}.{class_name}", share, open_interval=False)
                _check_class(name, f"{where}.{class_name}", class_name, names)
                if class_name not in reference:
                    raise ConfigValueError(
                        f"prior {name}: {where} states {class_name!r}, which has no "
                        f"reference share (reference.{class_name})"
                    )
            stated_total = sum(stated.values())
            reference_total = sum(reference[c] for c in stated)
            if stated_total > 1 + 1e-6 or reference_total >= 1:
                raise ConfigValueError(
                    f"prior {name}: the shares of {where} (or their references) add up to "
                    "more than 1"
                )
            rest = max(1 - stated_total, 1e-6) / (1 - reference_total)
            row = np.full(len(names), rest, dtype=np.float64)
            for class_name, share in stated.items():
                row[names.index(class_name)] = max(share, 1e-6) / reference[class_name]
            factors[int(code)] = row
        return cls(name, factors)

    def reweight(self, probabilities: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Probabilities (classes, rows, cols) times each pixel's factors, renormalised (in
        place)."""
        factors = self.factors[codes]  # (rows, cols, classes)
        probabilities *= np.moveaxis(factors, -1, 0)
        probabilities /= np.maximum(probabilities.sum(axis=0, keepdims=True), 1e-12)
        return probabilities


def _check_share(name: str, where: str, share: float, *, open_interval: bool) -> None:
    low_ok = share > 0 if open_interval else share >= 0
    if not (np.isfinite(share) and low_ok and share < 1 + (0 if open_interval else 1e-9)):
        bounds = "(0, 1)" if open_interval else "[0, 1]"
        raise ConfigValueError(f"prior {name}: {where}={share} must be in {bounds}")


def _check_class(name: str, where: str, class_name: str, names: list[str]) -> None:
    if class_name not in names:
        raise ConfigValueError(
            f"prior {name}: {where} names class {class_name!r}, not one of the model's "
            f"classes {names}"
        )


def records_prior(metadata: Mapping[str, Any]) -> bool:
    """Whether a model's metadata records a prior layer (a table with at least one code)."""
    return bool((metadata.get("prior") or {}).get("codes"))


def prior_of(metadata: Mapping[str, Any], schema: ClassSchema) -> PriorLayer | None:
    """The model's prior layer, if its metadata records one."""
    if not records_prior(metadata):
        return None
    return PriorLayer.from_metadata(metadata["prior"], schema)


def literal_template(path: str) -> str:
    """`predict.prior_layer` naming exactly `path` (its braces are not placeholders)."""
    return path.replace("{", "{{").replace("}", "}}")


def prior_table(name: str) -> dict[str, Any]:
    """A prior table of `conf/prior/` by name (what training records in a model's metadata)."""
    path = Path(CONFIG_DIR) / "prior" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigValueError(f"prior {name!r}: no {path} (known: {known})")
    table = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(table, dict)
    return {str(k): v for k, v in table.items()}


def with_prior(model: LoadedModel, table: Mapping[str, Any]) -> LoadedModel:
    """The same network with a prior layer fused into its maps (checked against its classes)."""
    PriorLayer.from_metadata(table, model.schema)
    return dataclasses.replace(model, metadata={**model.metadata, "prior": dict(table)})
