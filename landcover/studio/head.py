"""The network's last layer, taken apart so that corrections can be learnt in seconds.

Like the interactive tool of the Chesapeake project, a retrain adapts only the final
convolution (features -> class logits) and keeps everything before it frozen. Its input, the
network's last feature map, is computed once per scene and kept; a retrain is then a small
linear fit on the corrected pixels (each a k x k neighbourhood of features), and a redraw is one
convolution over the kept features: no forward pass through the network again.

Which layer: the last `Conv2d` of the network whose outputs are the classes, provided the model's
logits are exactly that convolution (or its ReLU, as in the 2018 network) at full resolution.
That is checked on the scene itself; an architecture whose head upsamples (DeepLabV3) is refused
in one line.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from landcover.errors import LandcoverError

WINDOW = 512  # core pixels of one forward pass; the scene is covered window by window
MIN_CONTEXT = 32  # pixels read around each window beyond the model's own margin


class HeadError(LandcoverError):
    """The model cannot be retrained in the studio (no full-resolution convolutional head)."""


@dataclass
class Head:
    """The final convolution's weights and what follows it (identity or ReLU)."""

    weight: torch.Tensor  # (classes, channels, k, k)
    bias: torch.Tensor  # (classes,)
    relu: bool

    @property
    def kernel(self) -> int:
        """Edge of the convolution's kernel (1 or 3 in practice)."""
        return int(self.weight.shape[-1])

    @property
    def reach(self) -> int:
        """Feature pixels on each side a class pixel reads."""
        return self.kernel // 2

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits of every pixel from features padded by `reach` on each side."""
        out = F.conv2d(features, self.weight, self.bias)
        return torch.relu(out) if self.relu else out


def find_head_conv(module: nn.Module, num_classes: int) -> nn.Conv2d:
    """The last convolution with one output per class: the classifier of a segmentation net."""
    found = [
        m for m in module.modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes
    ]
    if not found:
        raise HeadError(f"the model has no convolution with {num_classes} outputs to retrain")
    conv = found[-1]
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
        raise HeadError("the model's last convolution is strided or grouped: not retrainable here")
    if conv.kernel_size[0] != conv.kernel_size[1] or conv.padding[0] != conv.kernel_size[0] // 2:
        raise HeadError("the model's last convolution does not keep the map's size")
    return conv


def with_head(module: nn.Module, head: Head, num_classes: int) -> nn.Module:
    """A copy of `module` whose last convolution holds `head`'s weights (what gets logged)."""
    adapted = copy.deepcopy(module).cpu().eval()
    conv = find_head_conv(adapted, num_classes)
    with torch.no_grad():
        conv.weight.copy_(head.weight)
        if conv.bias is None:
            conv.bias = nn.Parameter(head.bias.clone())
        else:
            conv.bias.copy_(head.bias)
    return adapted


@dataclass
class SceneFeatures:
    """The last feature map over a whole scene, padded by the head's reach (float16 to halve
    memory: 64 channels x 1 Mpx is 128 MiB)."""

    features: np.ndarray  # (channels, height + 2 reach, width + 2 reach)
    head: Head
    height: int
    width: int

    def probabilities_at(self, row: int, col: int, head: Head | None = None) -> torch.Tensor:
        """Class probabilities of one pixel under `head` (the current head by default)."""
        head = head or self.head
        k = head.kernel
        block = self.features[:, row : row + k, col : col + k].astype(np.float32)
        with torch.no_grad():
            return torch.softmax(head.logits(torch.from_numpy(block)[None])[0, :, 0, 0], 0)

    def classes_and_confidence(self, head: Head | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Class index (uint8) and softmax confidence (float32) of every pixel under `head`."""
        head = head or self.head
        classes = np.empty((self.height, self.width), dtype=np.uint8)
        confidence = np.empty((self.height, self.width), dtype=np.float32)
        for top in range(0, self.height, 256):
            rows = slice(top, min(top + 256, self.height))
            block = self.features[:, rows.start : rows.stop + 2 * head.reach]
            with torch.no_grad():
                logits = head.logits(torch.from_numpy(block.astype(np.float32))[None])[0]
                probabilities = torch.softmax(logits, dim=0)
                best, index = probabilities.max(dim=0)
            classes[rows] = index.numpy().astype(np.uint8)
            confidence[rows] = best.numpy()
        return classes, confidence

    def neighbourhoods(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(pixels, channels x k x k) features each listed pixel's logits read."""
        kernel = self.head.kernel
        offsets = np.arange(kernel)
        r = rows[:, None, None] + offsets[None, :, None]
        c = cols[:, None, None] + offsets[None, None, :]
        patches = self.features[:, r, c]  # (channels, pixels, k, k)
        size = self.features.shape[0] * kernel * kernel  # named: -1 cannot size 0 pixels
        return np.ascontiguousarray(patches.transpose(1, 0, 2, 3).reshape(len(rows), size))


def _windows(height: int, width: int) -> Iterator[tuple[int, int, int, int]]:
    for top in range(0, height, WINDOW):
        for left in range(0, width, WINDOW):
            yield top, left, min(WINDOW, height - top), min(WINDOW, width - left)


def scene_features(
    module: nn.Module,
    image: np.ndarray,
    num_classes: int,
    output_margin: int,
) -> SceneFeatures:
    """Run the network over `image` (bands, H, W raw pixels) window by window, keeping its last
    feature map, and check that the logits are that map through the head."""
    module = module.eval()
    conv = find_head_conv(module, num_classes)
    head_probe: dict[str, torch.Tensor] = {}
    hook = conv.register_forward_hook(
        lambda _m, inputs, output: head_probe.update(features=inputs[0], conv=output)
    )
    reach = conv.kernel_size[0] // 2
    context = max(output_margin, MIN_CONTEXT) + reach
    bands, height, width = image.shape
    mode: Literal["reflect", "symmetric"] = (
        "reflect" if context < min(height, width) else "symmetric"
    )
    padded = np.pad(image, ((0, 0), (context, context), (context, context)), mode=mode)
    features: np.ndarray | None = None
    relu: bool | None = None
    try:
        for top, left, rows, cols in _windows(height, width):
            piece = padded[:, top : top + rows + 2 * context, left : left + cols + 2 * context]
            with torch.no_grad():
                logits = module(torch.from_numpy(np.ascontiguousarray(piece, np.float32))[None])
            frame = head_probe["features"][0]
            if relu is None:  # checked once, before anything is kept
                relu = _head_activation(head_probe["conv"][0], logits[0], output_margin)
            if features is None:
                features = np.zeros(
                    (frame.shape[0], height + 2 * reach, width + 2 * reach), np.float16
                )
            start = context - reach
            ring = frame[:, start : start + rows + 2 * reach, start : start + cols + 2 * reach]
            features[:, top : top + rows + 2 * reach, left : left + cols + 2 * reach] = ring.numpy()
    finally:
        hook.remove()
    assert features is not None and relu is not None
    bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(num_classes)
    head = Head(conv.weight.detach().clone().float(), bias.float(), relu)
    return SceneFeatures(features, head, height, width)


def _head_activation(conv_out: torch.Tensor, logits: torch.Tensor, margin: int) -> bool:
    """Whether the model's logits are the head's output (False) or its ReLU (True); any other
    relation is refused (an upsampling head, a post-processing step)."""
    height, width = logits.shape[-2:]
    direct = conv_out[:, margin : margin + height, margin : margin + width]
    if direct.shape != logits.shape:
        raise HeadError(
            "the model's last convolution is not at full resolution (its head upsamples): "
            "the studio retrains networks whose classifier runs on full-resolution features "
            "(unet, the 2018 seed network)"
        )
    scale = float(logits.abs().max()) or 1.0
    if float((direct - logits).abs().max()) <= 1e-3 * scale:
        return False
    if float((torch.relu(direct) - logits).abs().max()) <= 1e-3 * scale:
        return True
    raise HeadError("the model's logits are not its last convolution's output: not retrainable")
