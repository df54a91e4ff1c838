"""The child networks a rule trains, and the synthetic objectives.

Every child maps a batch to outputs that its task's loss reads: class
logits for the image tasks, a prediction or the objective itself for the
synthetic ones.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def digits_mlp(hidden: int = 64) -> nn.Module:
    """The digits child: 64 pixels -> `hidden` ReLU units -> 10 logits."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def fashion_mlp(inputs: int = 196, hidden: int = 64, classes: int = 10) -> nn.Module:
    """The fashion-mlp child: `inputs` pixels -> `hidden` sigmoid units -> `classes` logits.

    Sigmoid rather than ReLU: its outputs are all positive and it saturates,
    so plain SGD and momentum crawl where sign-based and adaptive rules do
    not, which spreads the standard optimizers' rewards apart.
    """
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Sigmoid(), nn.Linear(hidden, classes))


def softmax_regression(inputs: int, classes: int) -> nn.Module:
    """The ill-conditioned child: one linear layer from `inputs` features to `classes` logits."""
    return nn.Linear(inputs, classes)


def paper_convnet(in_channels: int, image_size: int, filters: int = 32, classes: int = 10) -> nn.Module:
    """The paper's child: two 3x3 convolutions of 32 filters, each with batch norm and ReLU.

    Each block max-pools by 2 (the paper leaves pooling unspecified; pooling
    after each block keeps the linear head small and a step 4x cheaper than
    pooling once at the end), then one linear layer reads the feature map.
    The pool runs before the ReLU: max-pooling commutes with any increasing
    function, so the network is conv-BN-ReLU-pool, with a quarter of the ReLU work.
    """
    def block(cin: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, filters, 3, padding=1, bias=False),   # batch norm supplies the bias
                nn.BatchNorm2d(filters), nn.MaxPool2d(2), nn.ReLU(inplace=True)]

    side = image_size // 4
    return nn.Sequential(*block(in_channels), *block(filters), nn.Flatten(),
                         nn.Linear(filters * side * side, classes))


class LinearRegression(nn.Module):
    """The quadratic task's child: y_hat = x @ w + b, so mean squared error is a quadratic in (w, b)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).squeeze(-1)


class Rosenbrock(nn.Module):
    """The Rosenbrock function over `dim` coordinates, its own child: forward returns f(w).

    f(w) = sum_i 100 (w[i+1] - w[i]^2)^2 + (1 - w[i])^2, minimum 0 at w = 1.
    The batch only sets how many steps an epoch has. Starts from the
    classic (-1.2, 1, -1.2, 1, ...), nudged by the seeded initial draw so
    that seeds differ.
    """

    def __init__(self, dim: int = 2):
        super().__init__()
        start = torch.tensor([-1.2, 1.0]).repeat((dim + 1) // 2)[:dim]
        self.w = nn.Parameter(start + 0.01 * torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:
        w = self.w
        return (100 * (w[1:] - w[:-1] ** 2) ** 2 + (1 - w[:-1]) ** 2).sum()
