"""Build a segmentation network from its config group (`conf/model/*.yaml`).

Every network is wrapped in `SegmentationModel`, which owns the input normalisation and the
size handling, so a logged model takes raw 4-band pixels of any size and needs no settings
repeated at prediction time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from landcover.models.pixel_gbm import PixelGBM
from landcover.models.seed import SeedNet

SMP_ARCHITECTURES = {"unet": smp.Unet, "fpn": smp.FPN, "deeplabv3plus": smp.DeepLabV3Plus}


class SegmentationModel(nn.Module):
    """Raw pixels in (B, bands, H, W, digital numbers), class logits out.

    `output_margin` pixels are lost on every side (the 2018 network predicts only the centre of
    its input); any H, W is accepted: inputs are mirrored up to a multiple of the network's
    stride and the logits cropped back.
    """

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

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        # one float copy, then in place: a batch of 16 x 4 x 256 x 256 is 16 MiB per temporary
        out = x.float() if x.dtype != torch.float32 else x.clone()
        return out.sub_(self.mean).div_(self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def build_smp(
    arch: str,
    *,
    encoder: str,
    encoder_depth: int,
    encoder_weights: str | None,
    in_channels: int,
    num_classes: int,
    **decoder: object,
) -> nn.Module:
    """An smp architecture; `decoder` takes that architecture's own decoder arguments."""
    if "decoder_channels" in decoder and isinstance(decoder["decoder_channels"], Sequence):
        decoder["decoder_channels"] = list(decoder["decoder_channels"])
    return SMP_ARCHITECTURES[arch](
        encoder_name=encoder,
        encoder_depth=encoder_depth,
        encoder_weights=encoder_weights,
        in_channels=in_channels,
        classes=num_classes,
        **decoder,
    )


def build_network(
    cfg: Mapping, *, in_channels: int, num_classes: int
) -> tuple[nn.Module, int, int]:
    """The bare network, its output margin and its size divisor."""
    params = dict(cfg)
    arch = params.pop("arch")
    if arch == "seed":
        return SeedNet(in_channels, num_classes), SeedNet.output_margin, SeedNet.size_divisor
    if arch == "pixel_gbm":
        return PixelGBM(in_channels, num_classes, **params), 0, 1
    if arch not in SMP_ARCHITECTURES:
        raise ValueError(
            f"model.arch={arch!r} is not one of {['seed', 'pixel_gbm', *SMP_ARCHITECTURES]}"
        )
    net = build_smp(arch, in_channels=in_channels, num_classes=num_classes, **params)
    return net, 0, 2 ** int(params["encoder_depth"])


def build_model(
    cfg: Mapping,
    *,
    in_channels: int,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> SegmentationModel:
    net, margin, divisor = build_network(cfg, in_channels=in_channels, num_classes=num_classes)
    if isinstance(net, PixelGBM):  # it reads raw digital numbers (NDVI needs them)
        mean, std = [0.0] * in_channels, [1.0] * in_channels
    return SegmentationModel(net, mean=mean, std=std, output_margin=margin, size_divisor=divisor)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


FLOPS_TILE = 256  # model/gflops_per_tile counts one 256 x 256 tile, whatever the patch size


def count_gflops(model: nn.Module, in_channels: int, tile: int = FLOPS_TILE) -> float | None:
    """Forward GFLOP (multiply-adds counted as 2) for one tile: a cost objective that sweeps can
    trade against accuracy. None for models that are not networks (per-pixel GBM)."""
    if not any(p.requires_grad for p in model.parameters()):
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
