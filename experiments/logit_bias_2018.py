"""Study: does a bias on the 2018 network's barren/impervious logit (post-hoc logit adjustment
for a rare class) carry from one quarter-quad to the other?

The imported 2018 CNTK model maps the real patches of both splits once (its logits cached per
tile); each bias is then added to the barren/impervious logit before the predictor blends the
tiles, and the maps are scored like `analysis/baselines.py` (4 classes, whole patches). A bias
that helps only on the split it was chosen on is tuning to that split (issue 16's guard).

    .venv/bin/python experiments/logit_bias_2018.py [--biases 0 0.5 1 1.5 2 3] \\
        [--cntk ../shared/models/seed-cntk/250epochs.model] \\
        [--data ../shared/data/chesapeake-sample]
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.baselines import patch_pairs, real_data_parser, score, scores_of  # noqa: E402
from landcover import artifacts  # noqa: E402
from landcover.artifacts.reference import LoadedModel  # noqa: E402
from landcover.artifacts.tutorial_model import load_schema  # noqa: E402
from landcover.data.scenes import quiet_georeferencing_warnings  # noqa: E402


def with_bias(model: LoadedModel, logits_of, index: int, bias: float) -> LoadedModel:
    """The model with `bias` added to class `index`'s logit (its tiles' logits from the cache)."""
    shift = np.zeros((1, len(model.metadata["schema"]["classes"]), 1, 1), np.float32)
    shift[0, index] = bias
    return dataclasses.replace(model, forward=lambda pixels: logits_of(pixels) + shift)


def cached(forward):
    """`forward` run once per distinct tile (every bias maps the same tiles)."""
    memory: dict[bytes, np.ndarray] = {}

    def run(pixels: np.ndarray) -> np.ndarray:
        key = (
            hashlib.blake2b(pixels.tobytes(), digest_size=16).digest() + str(pixels.shape).encode()
        )
        if key not in memory:
            memory[key] = forward(pixels)
        return memory[key].copy()

    return run


def main() -> int:
    quiet_georeferencing_warnings()
    parser = real_data_parser(__doc__.splitlines()[0])
    parser.add_argument("--biases", type=float, nargs="+", default=[0, 0.5, 1, 1.5, 2, 3])
    args = parser.parse_args()
    model = artifacts.load(str(args.cntk), device="cpu")
    names = [c["name"] for c in model.metadata["schema"]["classes"]]
    index = names.index("barren_impervious")
    logits_of = cached(model.forward)
    scheme = load_schema("chesapeake_4class")
    columns = ["overall_accuracy", *[f"iou_{c}" for c in scheme.names], "mIoU"]
    print("| split | bias | " + " | ".join(columns) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
    for split in ("train", "val"):
        pairs = patch_pairs(args.data, split, args.imagery)
        for bias in args.biases:
            with tempfile.TemporaryDirectory() as tmp:
                matrix, _ = score(
                    with_bias(model, logits_of, index, bias), pairs, scheme, Path(tmp)
                )
            row = scores_of(matrix, scheme)
            print(
                f"| {split} | {bias:+.1f} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
