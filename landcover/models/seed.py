"""The 2018 CNTK land cover tutorial's network, re-implemented in PyTorch.

Built from the published facts (../shared/models/seed-cntk/README.md): 4 x 256 x 256 in,
5 x 128 x 128 centre out (64 px of context on every side), an encoder of 3 x 3 convolutions
with stride-2 stages at 64, 32, 32, 32 channels and no residual additions, a decoder that
upsamples with three stride-2 transposed convolutions and merges each level's skip by summing
1 x 1 convolutions followed by ReLU, and a final 3 x 3 convolution with ReLU. Layers are kept
in the tutorial's order and with its shapes so the trained CNTK weights can be loaded into it
tensor by tensor.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SkipMerge(nn.Module):
    """relu(conv1x1(upsampled) + conv1x1(skip)): the tutorial's additive skip connection."""

    def __init__(self, up_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.from_up = nn.Conv2d(up_channels, out_channels, 1)
        self.from_skip = nn.Conv2d(skip_channels, out_channels, 1)

    def forward(self, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.from_up(up) + self.from_skip(skip))


class SeedNet(nn.Module):
    """Fully convolutional; predicts every input pixel, the wrapper keeps the centre."""

    stages: tuple[int, ...] = (64, 32, 32, 32)
    output_margin = 64
    size_divisor = 8

    def __init__(self, in_channels: int = 4, num_classes: int = 5) -> None:
        super().__init__()
        c0, c1, c2, c3 = self.stages
        self.encoder = nn.ModuleList(
            [
                nn.Sequential(conv_bn_relu(in_channels, c0), conv_bn_relu(c0, c0)),
                nn.Sequential(conv_bn_relu(c0, c1, 2), conv_bn_relu(c1, c1), conv_bn_relu(c1, c1)),
                nn.Sequential(conv_bn_relu(c1, c2, 2), conv_bn_relu(c2, c2), conv_bn_relu(c2, c2)),
                nn.Sequential(conv_bn_relu(c2, c3, 2), conv_bn_relu(c3, c3), conv_bn_relu(c3, c3)),
            ]
        )
        skips = (c2, c1, c0)
        ups = (c3, c2, c1)
        self.upsample = nn.ModuleList([nn.ConvTranspose2d(u, u, 2, stride=2) for u in ups])
        self.merge = nn.ModuleList([SkipMerge(u, s, s) for u, s in zip(ups, skips, strict=True)])
        self.refine = nn.ModuleList(
            [nn.Sequential(conv_bn_relu(s, s), conv_bn_relu(s, s)) for s in skips]
        )
        self.head = nn.Sequential(
            nn.Conv2d(c0, c0, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c0, num_classes, 3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The tutorial centres R, G, B on each patch's mean inside the network (not NIR).
        rgb_mean = x[:, :3].mean(dim=(2, 3), keepdim=True)
        x = torch.cat([x[:, :3] - rgb_mean, x[:, 3:]], dim=1)
        features = []
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        x = features.pop()
        for upsample, merge, refine in zip(self.upsample, self.merge, self.refine, strict=True):
            x = refine(merge(upsample(x), features.pop()))
        return self.head(x)
