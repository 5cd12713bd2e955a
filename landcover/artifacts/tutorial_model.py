"""The 2018 tutorial's models at rest: what a CNTK file becomes in memory, with the tutorial's
own settings as constants.

Any command that takes a model reference takes a CNTK `.model` file itself (`init.model=
.../250epochs.model` starts a training run from it without an import run first); the model
loader reaches here, below every command. `landcover-import-cntk` logs the same network, and
its config (`conf/commands/import_cntk.yaml`) starts from these values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from landcover.artifacts.cntk_graph import import_cntk_seed
from landcover.data.schema import ClassSchema
from landcover.errors import ConfigError
from landcover.models import SegmentationModel
from landcover.models.seed import SeedNet
from landcover.paths import CONFIG_DIR

TUTORIAL_SCHEMA = "tutorial_5label"  # the published models' 5 outputs
TUTORIAL_BANDS = ("red", "green", "blue", "nir")
# the tutorial's scaling: divide by 256 (the network centres R, G, B itself)
TUTORIAL_MEAN = (0.0, 0.0, 0.0, 0.0)
TUTORIAL_STD = (256.0, 256.0, 256.0, 256.0)


def load_schema(name: str) -> ClassSchema:
    """A class schema by name from `conf/data/schema/`."""
    path = Path(CONFIG_DIR) / "data" / "schema" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"schema={name!r}: no {path}")
    document = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(document, dict)  # a schema file is a mapping
    return ClassSchema.from_config(document)


def tutorial_metadata(
    schema: ClassSchema,
    source: Path,
    digest: str,
    band_names: Sequence[str] = TUTORIAL_BANDS,
    mean: Sequence[float] = TUTORIAL_MEAN,
    std: Sequence[float] = TUTORIAL_STD,
) -> dict:
    """The metadata a landcover model carries, for the 2018 network and its labels."""
    return {
        "landcover_format": 2,
        "arch": "seed",
        "model": {"arch": "seed"},
        "schema": schema.to_dict(),
        "bands": 4,
        "band_names": list(band_names),
        "normalize": {"mean": list(mean), "std": list(std)},
        "input": "raw digital numbers, float32 (batch, bands, height, width), any height/width",
        "output_margin": SeedNet.output_margin,
        "size_divisor": SeedNet.size_divisor,
        "patch_size": 256,
        "source": f"CNTK {source.name} (sha256 {digest[:16]})",
    }


def tutorial_model(
    net: SeedNet, mean: Sequence[float] = TUTORIAL_MEAN, std: Sequence[float] = TUTORIAL_STD
) -> SegmentationModel:
    """The imported network behind the tutorial's input scaling and 64 px margin."""
    return SegmentationModel(
        net,
        mean=list(mean),
        std=list(std),
        output_margin=SeedNet.output_margin,
        size_divisor=SeedNet.size_divisor,
    ).eval()


def load_cntk_file(path: Path) -> tuple[SegmentationModel, dict]:
    """A 2018 tutorial CNTK model file as the network and metadata, in memory, with the
    tutorial's settings (5 labels, inputs / 256)."""
    imported = import_cntk_seed(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    metadata = tutorial_metadata(load_schema(TUTORIAL_SCHEMA), path, digest)
    return tutorial_model(imported.net), metadata
