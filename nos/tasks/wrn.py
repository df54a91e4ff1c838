"""Wide Residual Networks (Zagoruyko & Komodakis, 2016), the larger network `nos transfer` trains.

    model = wide_resnet(depth=16, width=4, in_channels=3)     # WRN-16-4 for 3x32x32 images
    depth, width = parse_model("wrn-16-4")

WRN-d-k: a 3x3 stem convolution to 16 channels, then three groups of
n = (d - 4) / 6 pre-activation basic blocks of widths 16k, 32k and 64k (the
second and third groups start with stride 2), then batch norm, ReLU, global
average pooling and a linear layer. A basic block is BN-ReLU-conv3x3-BN-ReLU-
conv3x3 plus its input; where the shape changes, the shortcut is a 1x1
convolution of the block's first pre-activation. No dropout (the paper's
WRN-d-k without the "-dropout" variant). The input's channels and size come
from the task: 1x28x28 for Fashion-MNIST (28 -> 14 -> 7), 3x32x32 for CIFAR-10.
"""

from __future__ import annotations

import re

import torch.nn.functional as F
from torch import Tensor, nn

# At most 4 digits each: int() of a name of thousands of digits is slow, and no such network is built.
MODEL_PATTERN = re.compile(r"^wrn-(\d{1,4})-(\d{1,4})$")
# Bounds checked before anything is built: a deeper network only hangs while its blocks are made,
# a wider one fails to allocate, and beyond MAX_PARAMETERS a snapshot (stored every epoch) passes a gigabyte.
MAX_DEPTH = 1000
MAX_WIDTH = 64
MAX_PARAMETERS = 250_000_000


def parse_model(name: str) -> tuple[int, int]:
    """(depth, width) of a model named `wrn-D-K`; ValueError explains a bad name or a network too large."""
    match = MODEL_PATTERN.match(name.strip().lower())
    if match is None:
        raise ValueError(f"unknown model {name[:40]!r}: expected wrn-DEPTH-WIDTH such as wrn-16-4 or wrn-28-10")
    depth, width = int(match.group(1)), int(match.group(2))
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"model {name!r}: a Wide ResNet's depth is 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), "
                         f"got {depth}")
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"model {name!r}: the width factor must be between 1 and {MAX_WIDTH}, got {width}")
    if depth > MAX_DEPTH:
        raise ValueError(f"model {name!r}: the depth must be at most {MAX_DEPTH}, got {depth}")
    size = parameter_count(depth, width)
    if size > MAX_PARAMETERS:
        raise ValueError(f"model {name!r} has {size:,} parameters; nos trains at most {MAX_PARAMETERS:,}")
    return depth, width


def parameter_count(depth: int, width: int, in_channels: int = 3, classes: int = 10) -> int:
    """The parameters of WRN-depth-width, counted without building it."""
    n = (depth - 4) // 6
    cin, total = 16, in_channels * 16 * 9
    for cout in (16 * width, 32 * width, 64 * width):
        first = 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout + (cin * cout if cin != cout else 0)
        # A block has a 1x1 shortcut where it changes the stride or the width; only a group's first
        # block does, and the stride-2 groups change the width there too.
        total += first + (n - 1) * (4 * cout + 18 * cout * cout)
        cin = cout
    return total + 2 * cin + cin * classes + classes


def model_name(depth: int, width: int) -> str:
    return f"wrn-{depth}-{width}"


class BasicBlock(nn.Module):
    """Pre-activation basic block: x + conv(relu(bn(conv(relu(bn(x)))))), 1x1-projected where shapes change."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        # The projection reads the pre-activation, as in the authors' code.
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, in_channels: int, classes: int = 10):
        super().__init__()
        parse_model(model_name(depth, width))   # validates depth and width
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.depth, self.width = depth, width
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for group, cout in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride=2 if group > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(self.stem(x))
        out = F.relu(self.bn(out))
        return self.head(out.mean(dim=(2, 3)))


def wide_resnet(depth: int, width: int, in_channels: int, classes: int = 10) -> WideResNet:
    return WideResNet(depth, width, in_channels, classes)
