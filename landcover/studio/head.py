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
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from landcover.atomic import atomic_target, write_text
from landcover.errors import LandcoverError
from landcover.models.transfer import classifier_conv

WINDOW = 512  # core pixels of one forward pass; the scene is covered window by window
MIN_CONTEXT = 32  # pixels read around each window beyond the model's own margin
CACHE_BYTES = 96 * 2**20  # feature blocks a session keeps in memory (the rest stay on disk)


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
    """The last convolution with one output per class: the classifier of a segmentation net,
    checked to be one the studio can refit."""
    conv = classifier_conv(module, num_classes)
    if conv is None:
        raise HeadError(f"the model has no convolution with {num_classes} outputs to retrain")
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


class SceneFeatures:
    """The last feature map over a whole scene, block by block (WINDOW x WINDOW core pixels, each
    block with the head's reach around it), in float16 to halve the bytes.

    A small scene keeps its blocks in memory. A session's scene keeps them in a folder on disk
    (`store`), one `.npy` per block written whole (a power cut leaves no half block under its
    name), and reads back the few it needs through a cache of `cache_bytes`: a 45 Mpx NAIP
    quarter-quad's features (GBs for a 64-channel network) never sit in memory at once, and a
    reopened session reads them instead of running the network again.
    """

    def __init__(
        self,
        head: Head,
        height: int,
        width: int,
        store: Path | None = None,
        cache_bytes: int | None = None,
    ) -> None:
        self.head = head
        self.height = height
        self.width = width
        self.store = store
        self.cache_bytes = CACHE_BYTES if cache_bytes is None else cache_bytes
        self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached = 0
        self.read_back = False  # the store held every block already (nothing was computed)

    # -- blocks --------------------------------------------------------------------------
    def _path(self, key: tuple[int, int]) -> Path:
        assert self.store is not None
        return self.store / f"{key[0]}_{key[1]}.npy"

    def put(self, key: tuple[int, int], block: np.ndarray) -> None:
        """Keep one block (block row, block column): (channels, rows + 2 reach, cols + 2 reach)."""
        block = np.ascontiguousarray(block, np.float16)
        if self.store is None:
            self._blocks[key] = block
            return
        with atomic_target(self._path(key)) as partial, open(partial, "wb") as out:
            np.save(out, block)

    def block(self, key: tuple[int, int]) -> np.ndarray:
        """One block's features (read from the store through the cache)."""
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        if self.store is None:
            raise KeyError(f"no features for block {key}")
        block = np.load(self._path(key))
        self._blocks[key] = block
        self._cached += block.nbytes
        while self._cached > self.cache_bytes and len(self._blocks) > 1:
            _, dropped = self._blocks.popitem(last=False)
            self._cached -= dropped.nbytes
        return block

    def block_keys(self) -> Iterator[tuple[int, int]]:
        """Every block, row by row (one per window the network ran over)."""
        for top, left, _, _ in _windows(self.height, self.width):
            yield top // WINDOW, left // WINDOW

    # -- what the head makes of them ------------------------------------------------------
    def probabilities_at(self, row: int, col: int, head: Head | None = None) -> torch.Tensor:
        """Class probabilities of one pixel under `head` (the current head by default)."""
        head = head or self.head
        k = head.kernel
        block = self.block((row // WINDOW, col // WINDOW))
        r, c = row % WINDOW, col % WINDOW
        piece = block[:, r : r + k, c : c + k].astype(np.float32)
        with torch.no_grad():
            return torch.softmax(head.logits(torch.from_numpy(piece)[None])[0, :, 0, 0], 0)

    def classes_and_confidence(self, head: Head | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Class index (uint8) and softmax confidence (float32) of every pixel under `head`."""
        head = head or self.head
        classes = np.empty((self.height, self.width), dtype=np.uint8)
        confidence = np.empty((self.height, self.width), dtype=np.float32)
        for top, left, rows, cols in _windows(self.height, self.width):
            block = self.block((top // WINDOW, left // WINDOW))
            for start in range(0, rows, 256):  # 256 rows at a time
                strip = block[:, start : min(start + 256, rows) + 2 * head.reach]
                with torch.no_grad():
                    logits = head.logits(torch.from_numpy(strip.astype(np.float32))[None])[0]
                    best, index = torch.softmax(logits, dim=0).max(dim=0)
                at = (slice(top + start, top + start + index.shape[0]), slice(left, left + cols))
                classes[at] = index.numpy().astype(np.uint8)
                confidence[at] = best.numpy()
        return classes, confidence

    def neighbourhoods(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(pixels, channels x k x k) features each listed pixel's logits read, in the order
        listed (read block by block, each block once)."""
        kernel = self.head.kernel
        offsets = np.arange(kernel)
        channels = int(self.head.weight.shape[1])
        out = np.empty((len(rows), channels * kernel * kernel), np.float16)
        across = -(-self.width // WINDOW)  # blocks in a row
        block_of = (rows // WINDOW) * across + cols // WINDOW
        for code in np.unique(block_of):
            chosen = np.flatnonzero(block_of == code)
            block = self.block(divmod(int(code), across))
            r = (rows[chosen] % WINDOW)[:, None, None] + offsets[None, :, None]
            c = (cols[chosen] % WINDOW)[:, None, None] + offsets[None, None, :]
            patches = block[:, r, c]  # (channels, pixels, k, k)
            out[chosen] = patches.transpose(1, 0, 2, 3).reshape(len(chosen), out.shape[1])
        return out


def _windows(height: int, width: int) -> Iterator[tuple[int, int, int, int]]:
    for top in range(0, height, WINDOW):
        for left in range(0, width, WINDOW):
            yield top, left, min(WINDOW, height - top), min(WINDOW, width - left)


class PixelSource(Protocol):
    """Where a scene's raw pixels come from: an array in memory or a raster read window by
    window (so a whole tile is never read at once)."""

    height: int
    width: int

    def read(self, top: int, left: int, rows: int, cols: int, context: int) -> np.ndarray:
        """(bands, rows + 2 context, cols + 2 context) float32, mirrored past the scene's edge."""
        ...


class ArrayPixels:
    """Pixels already in memory (bands, H, W)."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.height, self.width = image.shape[1:]

    def read(self, top: int, left: int, rows: int, cols: int, context: int) -> np.ndarray:
        """The window with `context` around it, mirrored past the edge."""
        return _mirrored(self.image, top, left, rows, cols, context)


class RasterPixels:
    """Pixels of a raster file, read window by window."""

    def __init__(self, path: Path) -> None:
        import rasterio

        self.path = path
        with rasterio.open(path) as src:
            self.height, self.width = src.height, src.width

    def read(self, top: int, left: int, rows: int, cols: int, context: int) -> np.ndarray:
        """The window with `context` around it (as much as the file has), mirrored past the
        edge exactly as the whole scene mirrored would be."""
        import rasterio
        from rasterio.windows import Window

        r0, c0 = max(0, top - context), max(0, left - context)
        r1 = min(self.height, top + rows + context)
        c1 = min(self.width, left + cols + context)
        with rasterio.open(self.path) as src:
            part = src.read(window=Window(c0, r0, c1 - c0, r1 - r0)).astype(np.float32)
        # `part` is the scene cut to the window: mirror it where the window leaves the scene
        return _mirrored(
            part, top - r0, left - c0, rows, cols, context, full=(self.height, self.width)
        )


def _mirrored(
    image: np.ndarray,
    top: int,
    left: int,
    rows: int,
    cols: int,
    context: int,
    full: tuple[int, int] | None = None,
) -> np.ndarray:
    """(bands, rows + 2 context, cols + 2 context) around a window of `image`, the scene
    mirrored past its edge (reflect, or symmetric for a scene smaller than the context). A
    piece cut from a larger scene (`full`: that scene's size) is padded only where the scene
    itself ends, so every window sees the pixels the whole mirrored scene would give it."""
    height, width = full or image.shape[1:]
    mode: Literal["reflect", "symmetric"] = (
        "reflect" if context < min(height, width) else "symmetric"
    )
    before_r, before_c = max(0, context - top), max(0, context - left)
    after_r = max(0, top + rows + context - image.shape[1])
    after_c = max(0, left + cols + context - image.shape[2])
    padded = np.pad(image, ((0, 0), (before_r, after_r), (before_c, after_c)), mode=mode)
    r, c = top - context + before_r, left - context + before_c
    return np.ascontiguousarray(padded[:, r : r + rows + 2 * context, c : c + cols + 2 * context])


def scene_features(
    module: nn.Module,
    image: np.ndarray | PixelSource,
    num_classes: int,
    output_margin: int,
    store: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SceneFeatures:
    """Run the network over the scene (raw pixels (bands, H, W), or a source read window by
    window) keeping its last feature map, and check that the logits are that map through the
    head. With `store`, the blocks go to disk as they are computed, and a store a previous run
    finished (its `complete.json`, written last) is read instead."""
    module = module.eval()
    source = ArrayPixels(image) if isinstance(image, np.ndarray) else image
    conv = find_head_conv(module, num_classes)
    bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(num_classes)
    head = Head(conv.weight.detach().clone().float(), bias.float(), relu=False)
    scene = SceneFeatures(head, source.height, source.width, store)
    done = store / "complete.json" if store is not None else None
    if done is not None and done.exists():
        head.relu = bool(json.loads(done.read_text())["relu"])
        scene.read_back = True
        return scene
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
    head_probe: dict[str, torch.Tensor] = {}
    hook = conv.register_forward_hook(
        lambda _m, inputs, output: head_probe.update(features=inputs[0], conv=output)
    )
    reach = conv.kernel_size[0] // 2
    context = max(output_margin, MIN_CONTEXT) + reach
    relu: bool | None = None
    windows = list(_windows(source.height, source.width))
    try:
        for n, (top, left, rows, cols) in enumerate(windows):
            piece = source.read(top, left, rows, cols, context)
            with torch.no_grad():
                logits = module(torch.from_numpy(piece)[None])
            frame = head_probe["features"][0]
            if relu is None:  # checked once, before anything is kept
                relu = _head_activation(head_probe["conv"][0], logits[0], output_margin)
            start = context - reach
            ring = frame[:, start : start + rows + 2 * reach, start : start + cols + 2 * reach]
            scene.put((top // WINDOW, left // WINDOW), ring.numpy())
            if progress:
                progress(n + 1, len(windows))
    finally:
        hook.remove()
    assert relu is not None
    head.relu = relu
    if done is not None:
        write_text(done, json.dumps({"relu": relu, "blocks": len(windows)}))
    return scene


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
