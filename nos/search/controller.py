"""The controller: an LSTM that writes a rule token by token.

Each position may only emit tokens of its kind (operand, unary or binary, as
`position_kinds(depth)` lays out a full tree of groups); the previous token
and the position are fed back in. Sampling draws a whole batch at once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nos.rules.vocabulary import IDS_BY_KIND, VOCAB_SIZE, position_kinds


def position_masks(depth: int) -> Tensor:
    """(positions, vocab) bool: which token ids each position may emit."""
    kinds = position_kinds(depth)
    mask = torch.zeros(len(kinds), VOCAB_SIZE, dtype=torch.bool)
    for pos, kind in enumerate(kinds):
        mask[pos, list(IDS_BY_KIND[kind])] = True
    return mask


class Controller(nn.Module):
    def __init__(self, depth: int, hidden: int = 64, embedding: int = 32, init_range: float = 0.08):
        super().__init__()
        masks = position_masks(depth)
        self.register_buffer("masks", masks, persistent=False)
        self.positions = masks.shape[0]
        self.start = VOCAB_SIZE   # the input before the first token
        self.token_embedding = nn.Embedding(VOCAB_SIZE + 1, embedding)
        self.position_embedding = nn.Embedding(self.positions, embedding)
        self.cell = nn.LSTMCell(embedding, hidden)
        self.head = nn.Linear(hidden, VOCAB_SIZE)
        for p in self.parameters():   # the paper's uniform initialisation
            nn.init.uniform_(p, -init_range, init_range)

    def _logits(self, pos: int, prev: Tensor, state):
        x = self.token_embedding(prev) + self.position_embedding.weight[pos]
        h, c = self.cell(x, state)
        logits = self.head(h).masked_fill(~self.masks[pos], float("-inf"))
        return logits, (h, c)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n token sequences, (n, positions) int64, and the log-probability of each, (n,)."""
        prev = torch.full((n,), self.start, dtype=torch.long)
        state = None
        out = []
        log_prob = torch.zeros(n)
        for pos in range(self.positions):
            logits, state = self._logits(pos, prev, state)
            prev = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
            log_prob = log_prob + torch.log_softmax(logits, dim=-1).gather(1, prev.unsqueeze(1)).squeeze(1)
            out.append(prev)
        return torch.stack(out, dim=1), log_prob

    def log_prob_and_entropy(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Per sequence: the summed log-probability of `tokens` and the summed entropy, (n,) each."""
        n = tokens.shape[0]
        prev = torch.full((n,), self.start, dtype=torch.long)
        state = None
        log_prob = torch.zeros(n)
        entropy = torch.zeros(n)
        for pos in range(self.positions):
            logits, state = self._logits(pos, prev, state)
            logp = torch.log_softmax(logits, dim=-1)
            log_prob = log_prob + logp.gather(1, tokens[:, pos:pos + 1]).squeeze(1)
            # masked entries have p = 0 and logp = -inf; zero logp there so neither
            # the entropy nor its gradient sees 0 * -inf
            safe = logp.masked_fill(~self.masks[pos], 0.0)
            entropy = entropy - (safe.exp() * safe).sum(-1)
            prev = tokens[:, pos]
        return log_prob, entropy
