"""What a child minimizes while training, and the score in [0, 1] it is judged by.

The score is what the protocol calls validation accuracy: real accuracy for
the classification tasks, and a bounded transform of the loss, 1 / (1 + loss),
for the synthetic ones (1 at the optimum, towards 0 as the loss grows), so
every task's reward lies in [0, 1] and bigger is better.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Validation runs in chunks: few Python round trips, bounded memory. On the CPU a smaller chunk's
# activations stay in cache, which pays more than the extra round trips cost.
CPU_SCORE_CHUNK, SCORE_CHUNK = 256, 2048


def score_chunk(device: torch.device, children: int = 1) -> int:
    """How many examples one validation forward pass takes on `device`, for a stack of `children`.

    A stack's pass holds every child's activations at once: the chunk shrinks with the stack so
    that a pass stays within one lone network's 8 chunks. cuDNN refuses a batch norm whose input
    has 2^31 elements or more (a stack of 56 convnet children at 2,048 examples each would).
    """
    chunk = CPU_SCORE_CHUNK if device.type == "cpu" else SCORE_CHUNK
    return max(1, min(chunk, 8 * chunk // children))


class Objective:
    name: str
    reward = "the score"   # what the reward is, in words (`nos tasks`)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def score_sum(self, out: Tensor, y: Tensor) -> Tensor:
        """The per-example score (or loss) summed over a chunk, as a tensor (no sync)."""
        raise NotImplementedError

    def stacked_loss(self, out: Tensor, y: Tensor) -> Tensor:
        """Each stacked child's training loss: out is [children, *one child's output]; a [children] tensor."""
        return torch.func.vmap(self.loss, in_dims=(0, None))(out, y)

    def finish(self, total: float, n: int) -> float:
        """The score from the summed chunk values over n examples."""
        raise NotImplementedError

    def output_problem(self, out: Tensor, y: Tensor, splits) -> str | None:
        """What is wrong with a child's output `out` for a batch of targets `y` (None: nothing), in one line."""
        return None

    def baseline(self, splits) -> float | None:
        """The score of predicting the training targets' mean for every validation example (None: no such thing)."""
        return None

    @torch.inference_mode()
    def score(self, model: nn.Module, x: Tensor, y: Tensor) -> float:
        was_training = model.training
        model.eval()   # batch norm uses its running statistics, as at test time
        try:
            chunk = score_chunk(x.device)
            total = sum((self.score_sum(model(x[i:i + chunk]), y[i:i + chunk])
                         for i in range(0, len(x), chunk)), torch.zeros((), device=x.device))
            return self.finish(float(total), len(x))   # the one host sync of a validation
        finally:
            model.train(was_training)


class Accuracy(Objective):
    """Classification: cross-entropy while training, accuracy as the score."""

    name = "accuracy"
    reward = "validation accuracy"

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y)

    def stacked_loss(self, out: Tensor, y: Tensor) -> Tensor:
        children, batch = out.shape[:2]
        losses = F.cross_entropy(out.reshape(children * batch, -1), y.repeat(children), reduction="none")
        return losses.view(children, batch).mean(1)

    def score_sum(self, out: Tensor, y: Tensor) -> Tensor:
        return (out.argmax(1) == y).sum()

    def output_problem(self, out: Tensor, y: Tensor, splits) -> str | None:
        if out.dim() != 2 or not out.is_floating_point():
            return (f"a classification child must output a float [batch, classes] tensor of scores; this one gives "
                    f"{out.dtype} of shape {tuple(out.shape)}")
        labels = torch.cat([splits.train_y, splits.val_y, splits.test_y])
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= out.shape[1]:
            return f"the labels run from {low} to {high}, but the child outputs {out.shape[1]} scores per example"
        return None

    def finish(self, total: float, n: int) -> float:
        return total / n


class InverseLoss(Objective):
    """Loss-based tasks: score = 1 / (1 + mean loss); a non-finite loss scores 0."""

    def finish(self, total: float, n: int) -> float:
        mean = total / n
        return 1.0 / (1.0 + mean) if mean == mean and mean != float("inf") else 0.0


class MeanSquaredError(InverseLoss):
    name = "mse"
    reward = "1 / (1 + validation MSE)"

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(out, y)

    def score_sum(self, out: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(out, y, reduction="sum")

    def output_problem(self, out: Tensor, y: Tensor, splits) -> str | None:
        if out.shape != y.shape:   # mse_loss would broadcast them against each other, and train wrong
            return (f"the child outputs shape {tuple(out.shape)} for targets of shape {tuple(y.shape)}: give the "
                    f"targets the output's shape (y.unsqueeze(1) for one output per example)")
        return None

    def baseline(self, splits) -> float | None:
        if not (splits.train_y.is_floating_point() and splits.val_y.is_floating_point()):
            return None   # the one-batch check has its say on such targets
        y = splits.val_y.double()
        return self.finish(float(self.score_sum(splits.train_y.double().mean(0).expand_as(y), y)), len(y))


class ModelValue(InverseLoss):
    """The child's output is the loss itself (Rosenbrock): the batch is ignored."""

    name = "value"
    reward = "1 / (1 + f(w))"

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return out

    def score_sum(self, out: Tensor, y: Tensor) -> Tensor:
        return out * len(y)   # the same value for every example: the mean is f(w)
