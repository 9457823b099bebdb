"""The CIFAR ResNets of He et al. (2016): depth ``6n + 2``, three stages, "option A" shortcuts.

The architecture behind most published CIFAR pruning tables, with the state-dict keys of the
widely used pretrained weights (Yerlan Idelbayev's ResNet-20/32/44/56, ``module.`` removed):
``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv{1,2}``, ``layer{1,2,3}.{i}.bn{1,2}``, ``linear``.
A config names one as ``factory: prunekit.models.cifar_resnet:cifar_resnet20`` and loads such
weights with ``checkpoint: cifar_resnet20.safetensors``. Inputs are normalised with mean
(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) for those weights.

Where a block changes the width or the resolution, its shortcut has no weights ("option A"):
it takes every second pixel (``x[:, :, ::2, ::2]``) and zero-pads the channels on both sides
(``planes // 4`` each side for a doubling width: 16 -> 32 -> 64).

Example:
    >>> import torch
    >>> model = cifar_resnet20()
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> sum(p.numel() for p in model.parameters())
    269722
    >>> cifar_resnet(depth=8, width=4).layer3[0].shortcut
    PadShortcut(in_planes=8, planes=16)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PadShortcut",
    "BasicBlock",
    "CifarResNet",
    "cifar_resnet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
]


class PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::2, ::2]``, channels zero-padded from ``in_planes`` to ``planes``.

    The padding is split evenly, ``(planes - in_planes) // 2`` channels before and the rest
    after (``planes // 4`` on each side when the width doubles, as in He et al.).

    Example:
        >>> PadShortcut(16, 32)(torch.ones(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        if planes < in_planes:
            raise ValueError(f"an option-A shortcut can only widen: in_planes={in_planes} > planes={planes}")
        self.in_planes, self.planes = in_planes, planes
        self.before = (planes - in_planes) // 2
        self.after = planes - in_planes - self.before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.before, self.after), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"in_planes={self.in_planes}, planes={self.planes}"


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; ``conv1`` has the block's stride."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if stride != 2:
                raise ValueError(f"an option-A shortcut subsamples by 2; got stride {stride}")
            self.shortcut = PadShortcut(in_planes, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """``conv1``-``bn1``-ReLU, three stages of ``blocks`` BasicBlocks, global average pool, ``linear``.

    Args:
        blocks: BasicBlocks per stage (``n``; the depth is ``6n + 2``).
        num_classes: Classifier outputs.
        width: Channels of the first stage; the others have ``2 * width`` and ``4 * width``
            (16 in the paper; small widths make fast tests).
        in_channels: Image channels.
    """

    def __init__(self, blocks: int = 3, num_classes: int = 10, width: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        for name, v in (
            ("blocks", blocks),
            ("num_classes", num_classes),
            ("width", width),
            ("in_channels", in_channels),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._stage(width, width, blocks, 1)
        self.layer2 = self._stage(width, 2 * width, blocks, 2)
        self.layer3 = self._stage(2 * width, 4 * width, blocks, 2)
        self.linear = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def cifar_resnet(depth: int = 20, num_classes: int = 10, width: int = 16, in_channels: int = 3) -> CifarResNet:
    """The CIFAR ResNet of ``depth`` layers (``6n + 2``: 8, 14, 20, 32, 44, 56, 110, ...).

    Example:
        >>> len(cifar_resnet(depth=56).layer1)
        9
        >>> cifar_resnet(depth=21)
        Traceback (most recent call last):
        ...
        ValueError: depth must be 6n + 2 (e.g. 20, 32, 44, 56, 110), got 21
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 (e.g. 20, 32, 44, 56, 110), got {depth!r}")
    return CifarResNet((depth - 2) // 6, num_classes, width, in_channels)


def cifar_resnet20(num_classes: int = 10, width: int = 16) -> CifarResNet:
    """ResNet-20 (0.27 M parameters, 41 M MACs at 32x32)."""
    return cifar_resnet(20, num_classes, width)


def cifar_resnet32(num_classes: int = 10, width: int = 16) -> CifarResNet:
    """ResNet-32."""
    return cifar_resnet(32, num_classes, width)


def cifar_resnet44(num_classes: int = 10, width: int = 16) -> CifarResNet:
    """ResNet-44."""
    return cifar_resnet(44, num_classes, width)


def cifar_resnet56(num_classes: int = 10, width: int = 16) -> CifarResNet:
    """ResNet-56 (0.85 M parameters, 126 M MACs at 32x32)."""
    return cifar_resnet(56, num_classes, width)
