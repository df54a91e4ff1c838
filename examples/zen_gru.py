"""Your own task, a sequence model: a character-level GRU reads the Zen of Python (`import this`).

Each example is `context` characters and the one that follows; the child predicts it from their
last hidden state, and the reward is the validation accuracy of that prediction. From this folder
(or with it on PYTHONPATH, on the driver's machine and every worker's):

    nos eval adam --task zen_gru:zen_gru
    nos enqueue --task zen_gru:zen_gru --budget 100

About a second an evaluation on one CPU thread.
"""

import codecs
import contextlib
import io

import torch
from torch import nn

from nos.tasks import from_tensors, task_factory


def zen() -> str:
    with contextlib.redirect_stdout(io.StringIO()):   # importing `this` prints the Zen
        import this
    return codecs.decode(this.s, "rot13")


class CharGRU(nn.Module):
    def __init__(self, vocabulary: int, embedding: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, embedding)
        self.gru = nn.GRU(embedding, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocabulary)

    def forward(self, x):
        states, _ = self.gru(self.embed(x))
        return self.head(states[:, -1])


@task_factory
def zen_gru(*, device="cpu", context=8, embedding=16, hidden=32, train_size=None, split_seed=0, **protocol):
    """About 850 windows of the text: 150 for validation, 150 for test, the rest (or train_size) to train."""
    text = zen()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    x, y = ids.unfold(0, context, 1)[:-1], ids[context:]
    return from_tensors(x, y, lambda: CharGRU(len(chars), embedding, hidden), objective="accuracy",
                        val_size=150, test_size=150, train_size=train_size, split_seed=split_seed,
                        device=device, **protocol)
