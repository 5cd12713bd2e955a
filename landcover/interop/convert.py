"""`landcover-convert-model`: turn a model saved by an older landcover into the safe format.

Older versions saved pickles (checkpoints with a pickled per-pixel GBM inside; logged models in
MLflow's pickled PyTorch flavour). Loading a pickle runs whatever code it holds, so every load
path now refuses them. This one-time command loads such a file the old way, only when told the
source is trusted (`--trust`), and writes it again as tensors plus JSON:

    landcover-convert-model outputs/.../checkpoints/best.pt --trust      # -> best.safe.pt
    landcover-convert-model <run id> --trust --tracking-uri sqlite:///mlflow.db
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from landcover.artifacts.checkpoint import save_checkpoint
from landcover.errors import LandcoverError


def _skops_state(value: Any) -> Any:
    """A pickled GBM estimator (bytes) as the uint8 tensor of skops bytes it is now."""
    if not isinstance(value, bytes):
        return value
    from landcover.models.pixel_gbm import estimator_state

    return estimator_state(pickle.loads(value))  # the user vouched for this file with --trust


def model_config_from_yaml(text: str) -> dict[str, Any]:
    """The `model` config of a training config saved as YAML text (old checkpoints)."""
    from omegaconf import OmegaConf

    from landcover.config import plain_dict

    return plain_dict(OmegaConf.create(text).model)


def convert_checkpoint(path: Path, output: Path) -> Path:
    """Rewrite a pickled old checkpoint as one that loads without running code (the user vouched for
    it)."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # trusted by the user
    if not isinstance(state, dict) or "model" not in state:
        raise LandcoverError(f"{path}: not a landcover training checkpoint")
    state["model"] = {k: _skops_state(v) for k, v in state["model"].items()}
    metadata = dict(state.get("metadata") or {})
    if "model" not in metadata and "config" in state:
        metadata["model"] = model_config_from_yaml(state["config"])
    metadata["landcover_format"] = 2
    state["metadata"] = metadata
    save_checkpoint(state, output)
    torch.load(output, map_location="cpu", weights_only=True)  # proves it is safe now
    return output


def convert_logged_model(reference: str, tracking_uri: str | None) -> str:
    """Log the old model's weights again, in the safe flavour, into its own run."""
    import mlflow

    from landcover.artifacts.files import rebuild
    from landcover.tracking import runs as tracking

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = f"runs:/{reference}/model" if len(reference) == 32 else reference
    info = mlflow.models.get_model_info(uri)
    old = mlflow.pytorch.load_model(uri, map_location="cpu")  # trusted by the user
    metadata = dict(info.metadata or {})
    if "model" not in metadata:
        if metadata.get("arch") == "seed":
            metadata["model"] = {"arch": "seed"}
        else:
            config = mlflow.artifacts.load_text(f"runs:/{info.run_id}/config/resolved.yaml")
            metadata["model"] = model_config_from_yaml(config)
    metadata["landcover_format"] = 2
    model = rebuild(metadata)
    model.load_state_dict({k: _skops_state(v) for k, v in old.state_dict().items()})
    return tracking.log_landcover_model(model.eval(), metadata, run_id=info.run_id)


def main(argv: list[str] | None = None) -> None:
    """`landcover-convert-model REFERENCE --trust`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="a checkpoint (.pt), a run id or a runs:/ URI")
    parser.add_argument(
        "--trust",
        action="store_true",
        help="load the old pickle (it can run code: only for files from a source you trust)",
    )
    parser.add_argument("--output", help="where the converted checkpoint goes")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI of the run")
    args = parser.parse_args(argv)
    if not args.trust:
        sys.exit(
            f"error: converting {args.reference} means unpickling it, which runs any code it "
            "holds; add --trust if it comes from a source you trust"
        )
    try:
        path = Path(args.reference)
        if path.is_file():
            output = Path(args.output) if args.output else path.with_suffix(".safe.pt")
            print(f"converted {path} -> {convert_checkpoint(path, output)}")
        else:
            converted = convert_logged_model(args.reference, args.tracking_uri)
            print(f"converted {args.reference} -> {converted}")
    except (LandcoverError, OSError, pickle.UnpicklingError) as err:
        sys.exit(f"error: {args.reference}: {err}")


if __name__ == "__main__":
    main()
