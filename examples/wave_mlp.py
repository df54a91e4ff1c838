"""Your own task, regression: an MLP learns a smooth function of a few inputs from noisy samples.

From this folder (or with it on PYTHONPATH, on the driver's machine and every worker's):

    nos eval adam --task wave_mlp:wave
    nos enqueue --task wave_mlp:wave --budget 100
    nos enqueue --task wave_mlp:wave --train-size 256 --budget 100     # another task key: results stay apart

The reward is 1 / (1 + validation mean squared error). Under a second an evaluation on one CPU thread.
"""

import torch
from torch import nn

from nos.tasks import from_tensors, task_factory


@task_factory
def wave(*, device="cpu", train_size=1024, inputs=2, hidden=32, noise=0.05, split_seed=0, **protocol):
    """y = sum of sin(2 x_i) over `inputs` inputs drawn from [-2, 2], plus Gaussian noise; a 2-layer tanh MLP."""
    protocol.setdefault("batch_size", 16)
    gen = torch.Generator().manual_seed(split_seed)
    x = torch.rand(train_size + 512, inputs, generator=gen) * 4 - 2
    y = torch.sin(2 * x).sum(1, keepdim=True) + noise * torch.randn(len(x), 1, generator=gen)

    def child():
        return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                             nn.Linear(hidden, 1))

    return from_tensors(x, y, child, objective="mse", val_size=256, test_size=256, split_seed=split_seed,
                        device=device, **protocol)
