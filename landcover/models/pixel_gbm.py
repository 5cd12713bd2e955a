"""A per-pixel gradient-boosting baseline (scikit-learn) with the face of a segmentation net.

Land cover papers compare their networks with per-pixel classifiers on the spectral values
alone; this is that baseline. It is a `torch.nn.Module` so that everything downstream (the
validation loop, checkpoints, MLflow logging, tiled prediction, evaluation, serving) takes it
unchanged: `forward` returns log-probabilities shaped like a network's logits. It is fitted,
not trained (`fitted_once` says so): the trainer hands it one pass of training batches
(`fit_batches`). The fitted estimator travels in the module's state dict as extra state: a
uint8 tensor of skops bytes (never pickle), loaded with a fixed list of trusted types, so a
model file cannot make loading run code.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from torch import nn

from landcover.data.schema import IGNORE_INDEX
from landcover.errors import LandcoverError

RED, NIR = 0, 3  # band order R, G, B, NIR (data.band_names)
# beyond skops' defaults (numpy, builtins, sklearn estimators), the fitted trees' own class
TRUSTED_TYPES = ["sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"]


class PixelGBM(nn.Module):
    """Features per pixel: the raw bands and, with 4 bands, NDVI."""

    output_margin = 0
    size_divisor = 1
    fitted_once = True  # fitted on one pass of labelled pixels, not trained by epochs
    reads_raw_pixels = True  # NDVI needs digital numbers, not normalised values

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        max_iter: int,
        learning_rate: float,
        max_leaf_nodes: int,
        l2_regularization: float,
        samples: int,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.samples = samples
        self.seed = seed
        self.settings = {
            "max_iter": max_iter,
            "learning_rate": learning_rate,
            "max_leaf_nodes": max_leaf_nodes,
            "l2_regularization": l2_regularization,
        }
        self.estimator: HistGradientBoostingClassifier | None = None

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """(N, bands) raw digital numbers -> (N, features)."""
        pixels = pixels.astype(np.float32)
        if self.in_channels < 4:
            return pixels
        red, nir = pixels[:, RED], pixels[:, NIR]
        ndvi = (nir - red) / np.maximum(nir + red, 1e-3)
        return np.concatenate([pixels, ndvi[:, None]], axis=1)

    def fit_batches(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Fit on the labelled pixels of (image, target) batches: the trainer's one epoch."""
        pixels, labels = [], []
        for image, target in batches:
            labelled = target != IGNORE_INDEX
            pixels.append(image.permute(0, 2, 3, 1)[labelled].cpu().numpy())
            labels.append(target[labelled].cpu().numpy())
        return self.fit_pixels(np.concatenate(pixels), np.concatenate(labels))

    def fit_pixels(self, pixels: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Fit on (N, bands) pixels with class indices; subsampled to `samples`."""
        rng = np.random.default_rng(self.seed)
        if len(labels) > self.samples:
            keep = rng.choice(len(labels), self.samples, replace=False)
            pixels, labels = pixels[keep], labels[keep]
        self.estimator = HistGradientBoostingClassifier(
            **self.settings, random_state=self.seed, early_stopping=False
        )
        self.estimator.fit(self.features(pixels), labels)
        return {
            "train/pixels": float(len(labels)),
            "train/iterations": float(self.estimator.n_iter_),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities per pixel shaped like a network's logits (uniform before fitting)."""
        batch, bands, height, width = x.shape
        if self.estimator is None:  # not fitted yet: uniform
            return torch.zeros(batch, self.num_classes, height, width, device=x.device)
        pixels = x.detach().permute(0, 2, 3, 1).reshape(-1, bands).float().cpu().numpy()
        probabilities = self.estimator.predict_proba(self.features(pixels))
        full = np.full((len(pixels), self.num_classes), 1e-7, dtype=np.float32)
        full[:, self.estimator.classes_] = np.maximum(probabilities, 1e-7)
        logits = torch.from_numpy(np.log(full)).to(x.device)
        return logits.reshape(batch, height, width, self.num_classes).permute(0, 3, 1, 2)

    def get_extra_state(self) -> torch.Tensor:
        """The fitted trees as skops bytes in the state dict (never pickle)."""
        return estimator_state(self.estimator)

    def set_extra_state(self, state: object) -> None:
        """Load fitted trees from skops bytes, refusing pickles and types off a fixed list."""
        if not isinstance(state, torch.Tensor):
            raise LandcoverError(
                "the per-pixel GBM's state is a pickle (saved by an older landcover), which can "
                "run code when loaded: convert the file with `landcover-convert-model --trust`"
            )
        if state.numel() == 0:
            self.estimator = None
            return
        import skops.io

        data = state.cpu().numpy().tobytes()
        untrusted = [t for t in skops.io.get_untrusted_types(data=data) if t not in TRUSTED_TYPES]
        if untrusted:
            raise LandcoverError(f"the per-pixel GBM's state holds untrusted types {untrusted}")
        self.estimator = skops.io.loads(data, trusted=TRUSTED_TYPES)


def estimator_state(estimator: HistGradientBoostingClassifier | None) -> torch.Tensor:
    """The fitted trees as a uint8 tensor of skops bytes (empty when not fitted)."""
    if estimator is None:
        return torch.zeros(0, dtype=torch.uint8)
    import skops.io  # 2.5 s to import: only when a GBM is saved or loaded

    return torch.frombuffer(bytearray(skops.io.dumps(estimator)), dtype=torch.uint8)
