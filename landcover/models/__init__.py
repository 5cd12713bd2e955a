"""Build a segmentation network from its config group (`conf/model/*.yaml`).

Every network is wrapped in `SegmentationModel`, which owns the input normalisation and the
size handling, so a logged model takes raw 4-band pixels of any size and needs no settings
repeated at prediction time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from landcover.models.pixel_gbm import PixelGBM
from landcover.models.seed import SeedNet
from landcover.upgrade import CONFIG_VERSION, upgrade_model_config


class SegmentationModel(nn.Module):
    """Raw pixels in (B, bands, H, W, digital numbers), class logits out.

    `output_margin` pixels are lost on every side (the 2018 network predicts only the centre of
    its input); any H, W is accepted: inputs are mirrored up to a multiple of the network's
    stride and the logits cropped back.
    """

    mean: torch.Tensor  # buffers, set in __init__
    std: torch.Tensor

    def __init__(
        self,
        net: nn.Module,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        output_margin: int = 0,
        size_divisor: int = 32,
    ) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.output_margin = output_margin
        self.size_divisor = size_divisor

    @property
    def fitted_once(self) -> bool:
        """Fitted on one pass of labelled pixels (no optimiser, no epochs), like the GBM."""
        return bool(getattr(self.net, "fitted_once", False))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        # one float copy, then in place: a batch of 16 x 4 x 256 x 256 is 16 MiB per temporary
        """(x - mean) / std with one float copy, then in place (a 16-patch batch is 16 MiB per
        temporary)."""
        out = x.float() if x.dtype != torch.float32 else x.clone()
        return out.sub_(self.mean).div_(self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for raw pixels of any size: mirrored up to the stride, cropped back, margins
        removed."""
        height, width = x.shape[-2:]
        x = self.normalize(x)
        pad_h = -height % self.size_divisor
        pad_w = -width % self.size_divisor
        if pad_h or pad_w:
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        logits = self.net(x)[..., :height, :width]
        m = self.output_margin
        return logits[..., m : height - m, m : width - m] if m else logits


def build_network(
    cfg: Mapping[str, Any], *, in_channels: int, num_classes: int
) -> tuple[nn.Module, int, int]:
    """The bare network, its output margin and its size divisor.

    Our own networks by `arch`; every other architecture through `smp.create_model`, whose
    argument names are the config's keys (one registry of architectures: smp's).
    """
    params = dict(cfg)
    arch = params.pop("arch")
    if arch == "seed":
        return SeedNet(in_channels, num_classes), SeedNet.output_margin, SeedNet.size_divisor
    if arch == "pixel_gbm":
        return PixelGBM(in_channels, num_classes, **params), 0, 1
    if isinstance(params.get("decoder_channels"), Sequence):
        params["decoder_channels"] = list(params["decoder_channels"])
    try:
        net = smp.create_model(arch, in_channels=in_channels, classes=num_classes, **params)
    except KeyError as err:
        raise ValueError(f"model.arch={arch!r}: {err}") from err
    return net, 0, 2 ** int(params["encoder_depth"])


def build_model(
    cfg: Mapping[str, Any],
    *,
    in_channels: int,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    config_version: int = CONFIG_VERSION,
) -> SegmentationModel:
    """The network `cfg` describes, wrapped to take raw pixels. `config_version`: the version
    of a stored config (checkpoints and logged models), upgraded to today's keys first."""
    cfg = upgrade_model_config(cfg, config_version)
    net, margin, divisor = build_network(cfg, in_channels=in_channels, num_classes=num_classes)
    if getattr(net, "reads_raw_pixels", False):
        mean, std = [0.0] * in_channels, [1.0] * in_channels
    return SegmentationModel(net, mean=mean, std=std, output_margin=margin, size_divisor=divisor)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters: the model size runs are compared by."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


FLOPS_TILE = 256  # model/gflops_per_tile counts one 256 x 256 tile, whatever the patch size


def count_gflops(model: nn.Module, in_channels: int, tile: int = FLOPS_TILE) -> float | None:
    """Forward GFLOP (multiply-adds counted as 2) for one tile: a cost objective that sweeps can
    trade against accuracy. None for models that are not networks (per-pixel GBM)."""
    if getattr(model, "fitted_once", False):
        return None
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_channels, tile, tile, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9
