"""A small ResNet-style CNN for the ``prunekit demo`` command and for examples.

It has what makes channel pruning non-trivial: residual additions (the channels of a stage
are coupled across every block of the stage), BatchNorm after every convolution, a
strided downsampling block with a 1x1 projection shortcut, global average pooling and a
linear classifier whose input features follow the last stage's channels.

Example:
    >>> import torch
    >>> model = DemoNet(in_channels=1, num_classes=10)
    >>> model(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["BasicBlock", "DemoNet"]


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, with a projection when shapes change."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class DemoNet(nn.Module):
    """Stem, two residual stages (the second one downsamples), global pool, linear head.

    Args:
        in_channels: Image channels (1 for 8x8 digits, 3 for 32x32 colour images).
        num_classes: Classifier outputs.
        width: Channels of the first stage; the second stage has ``2 * width``.
        blocks: Residual blocks per stage.

    Any spatial size of at least 2x2 works (the pooling is adaptive).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, blocks: int = 2) -> None:
        super().__init__()
        if width < 1 or blocks < 1:
            raise ValueError(f"width and blocks must be positive, got width={width}, blocks={blocks}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.stage1 = nn.Sequential(*[BasicBlock(width, width) for _ in range(blocks)])
        self.stage2 = nn.Sequential(
            BasicBlock(width, 2 * width, stride=2), *[BasicBlock(2 * width, 2 * width) for _ in range(blocks - 1)]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))
