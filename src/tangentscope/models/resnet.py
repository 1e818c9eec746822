"""Residual convolutional networks for 3×32×32 (CIFAR-sized) inputs.

:class:`ResNet` is a stem convolution with BatchNorm, then stages of basic blocks (two 3×3
convolutions, each followed by BatchNorm, ReLU after the residual sum), the first block of every
stage after the first with stride 2; global average pooling and a linear head. A shortcut that
changes the shape is a 1×1 convolution with BatchNorm (``shortcut="projection"``) or the
parameter-free "option A" of He et al. (2016): stride-2 subsampling and zero channels
(``shortcut="pad"``). Convolutions carry no bias (BatchNorm follows each of them).

:func:`resnet8x` is the issue-16 benchmark net (eight blocks 16→32→64→128, projection
shortcuts, ≈ 0.70 M parameters); :func:`resnet20` the CIFAR ResNet-20 (three stages of three
blocks, 16→32→64, option-A shortcuts, ≈ 0.27 M parameters). BatchNorm is used in eval mode for
kernels (call ``.eval()``): per-example outputs then do not depend on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["BasicBlock", "ResNet", "resnet8x", "resnet20"]

_SHORTCUTS = ("projection", "pad")


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    Args:
        c_in: input channels.
        c_out: output channels.
        stride: stride of the first convolution (and of the shortcut).
        shortcut: ``"projection"`` (1×1 convolution + BatchNorm) or ``"pad"`` (subsample and
            zero channels), used only when the shape changes.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, shortcut: str = "projection"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.extra = stride, c_out - c_in
        self.proj: nn.Sequential | None = None
        if (stride != 1 or c_in != c_out) and shortcut == "projection":
            self.proj = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(c_out))

    def shortcut(self, x: Tensor) -> Tensor:
        """The residual branch's partner ``(B, c_out, H/stride, W/stride)``."""
        if self.proj is not None:
            return self.proj(x)
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv + BN + ReLU, stages of :class:`BasicBlock`, global average pool, linear head.

    Args:
        p: outputs.
        widths: channels of each stage (stage ``k > 0`` halves the resolution).
        blocks: basic blocks per stage (an int: the same for every stage).
        shortcut: ``"projection"`` or ``"pad"`` (see :class:`BasicBlock`).
        in_channels: input channels.

    Shapes:
        ``(B, in_channels, H, W) -> (B, p)``.
    """

    def __init__(self, p: int = 10, widths: Sequence[int] = (16, 32, 64, 128),
                 blocks: int | Sequence[int] = 2, shortcut: str = "projection",
                 in_channels: int = 3):
        super().__init__()
        if shortcut not in _SHORTCUTS:
            raise ConfigError(f"shortcut={shortcut!r} is not one of {_SHORTCUTS}: use "
                              "'projection' (1×1 conv + BN) or 'pad' (option A)")
        widths = [int(w) for w in widths]
        per = [int(blocks)] * len(widths) if isinstance(blocks, int) else [int(b) for b in blocks]
        if not widths or len(per) != len(widths) or min(widths + per) < 1:
            raise ConfigError(f"widths={widths} and blocks={blocks} must be positive and of one "
                              "length per stage, e.g. widths=(16, 32, 64), blocks=3")
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        c = widths[0]
        for k, (w, nb) in enumerate(zip(widths, per)):
            for j in range(nb):
                layers.append(BasicBlock(c, w, 2 if (k > 0 and j == 0) else 1, shortcut))
                c = w
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(c, p)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.head(h.mean((2, 3)))


def resnet8x(p: int = 10, width: int = 16, blocks: int = 2) -> ResNet:
    """The issue-16 benchmark net: four stages ``width · (1, 2, 4, 8)`` channels, ``blocks``
    basic blocks each (eight in all by default, ≈ 0.70 M parameters at ``width=16``),
    projection shortcuts."""
    return ResNet(p, [width * 2 ** k for k in range(4)], blocks, "projection")


def resnet20(p: int = 10, width: int = 16, blocks: int = 3) -> ResNet:
    """ResNet-20 for CIFAR (He et al., 2016): three stages ``width · (1, 2, 4)`` of ``blocks``
    basic blocks (``6 · blocks + 2`` layers), option-A shortcuts; ≈ 0.27 M parameters."""
    return ResNet(p, [width * 2 ** k for k in range(3)], blocks, "pad")
