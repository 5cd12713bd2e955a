"""The 2018 CNTK land cover tutorial's network, re-implemented in PyTorch.

Its layers follow the graph decoded from the published model files
(`landcover.artifacts.cntk_graph`), so the trained CNTK weights load into it tensor by tensor:

- the input's R, G and B are centred on the patch's own mean (NIR is not);
- encoder: four levels of 3 x 3 convolution + batch norm (+ ReLU), 5 convolutions at 64
  channels (the very first without ReLU), then 4 at 32 channels per level, each level opened by
  a stride-2 convolution;
- decoder: three stride-2 3 x 3 transposed convolutions; after each, a 1 x 1 convolution of the
  upsampled map is added to a 1 x 1 convolution of the encoder's map at that level, then ReLU;
  at full resolution a 3 x 3 convolution of the (centred) input joins the sum;
- head: 3 x 3 convolution to the classes, then ReLU (the logits are non-negative).

25 convolutions, 3 transposed convolutions, 17 batch norms, 314,373 parameters. It predicts
every input pixel; the tutorial keeps the centre 128 of 256 (`output_margin`).
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBN(nn.Sequential):
    """3 x 3 convolution (no bias) + batch norm (+ ReLU): one encoder step."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, relu: bool = True):
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels, eps=1e-5),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def upsample(channels: int) -> nn.ConvTranspose2d:
    # CNTK's "same" transposed convolution: the adjoint of a stride-2, pad-1 3 x 3 convolution
    """The 2018 network's 2x transposed convolution step."""
    return nn.ConvTranspose2d(
        channels, channels, 3, stride=2, padding=1, output_padding=1, bias=False
    )


class SeedNet(nn.Module):
    """Fully convolutional; predicts every input pixel, the wrapper keeps the centre."""

    output_margin = 64
    size_divisor = 8

    def __init__(self, in_channels: int = 4, num_classes: int = 5) -> None:
        super().__init__()
        self.encoder: nn.ModuleList = nn.ModuleList(
            [
                nn.Sequential(
                    ConvBN(in_channels, 64, relu=False), *[ConvBN(64, 64) for _ in range(4)]
                ),
                nn.Sequential(ConvBN(64, 32, stride=2), *[ConvBN(32, 32) for _ in range(3)]),
                nn.Sequential(ConvBN(32, 32, stride=2), *[ConvBN(32, 32) for _ in range(3)]),
                nn.Sequential(ConvBN(32, 32, stride=2), *[ConvBN(32, 32) for _ in range(3)]),
            ]
        )
        # decoder step i upsamples to encoder level 2 - i and merges that level's features
        self.upsample = nn.ModuleList([upsample(32) for _ in range(3)])
        self.from_up = nn.ModuleList(
            [nn.Conv2d(32, 32, 1), nn.Conv2d(32, 32, 1), nn.Conv2d(32, 64, 1)]
        )
        self.from_skip = nn.ModuleList(
            [nn.Conv2d(32, 32, 1), nn.Conv2d(32, 32, 1), nn.Conv2d(64, 64, 1)]
        )
        self.from_input = nn.Conv2d(in_channels, 64, 3, padding=1)
        self.head = nn.Conv2d(64, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for the centre of the input (the margin is cropped by SegmentationModel)."""
        rgb_mean = x[:, :3].mean(dim=(2, 3), keepdim=True)
        x = torch.cat([x[:, :3] - rgb_mean, x[:, 3:]], dim=1)
        features = []
        y = x
        for level in self.encoder:
            y = level(y)
            features.append(y)
        for step in range(3):
            skip = features[2 - step]
            merged = self.from_skip[step](skip) + self.from_up[step](self.upsample[step](y))
            if step == 2:
                merged = merged + self.from_input(x)
            y = torch.relu(merged)
        return torch.relu(self.head(y))
