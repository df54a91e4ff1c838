"""`nos demo`: the rule language and SymbolicOptimizer at work, in a few seconds, offline."""

from __future__ import annotations

import click
import torch
from rich.table import Table

from nos.optim import BUILTINS, SymbolicOptimizer
from nos.rules import min_depth, parse, state_buffers, to_text
from nos.rules.builtins import PAPER_EXAMPLES

from .console import make_console


def _digits() -> tuple[torch.Tensor, ...]:
    from nos.tasks.data import load_digits_arrays

    x, y = load_digits_arrays()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _train(rule: str, lr: float, data, epochs: int = 3) -> float:
    x, y, xv, yv = data
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    steps = epochs * (len(x) // 64)
    opt = SymbolicOptimizer(model.parameters(), rule, lr=lr, total_steps=steps, seed=0)
    for _ in range(epochs):
        for i in range(0, len(x) - 63, 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    with torch.no_grad():
        return (model(xv).argmax(1) == yv).float().mean().item()


@click.command("demo")
def demo_command() -> None:
    """Parse the paper's rules and train on digits with each built-in."""
    console = make_console()
    table = Table(title="Rules parse to canonical trees")
    for column in ("rule", "canonical", "depth", "state buffers"):
        table.add_column(column)
    for text in PAPER_EXAMPLES:
        tree = parse(text)
        table.add_row(text, to_text(tree), str(min_depth(tree)), ", ".join(state_buffers(tree)) or "-")
    console.print(table)

    torch.set_num_threads(1)
    data = _digits()
    table = Table(title="SymbolicOptimizer on digits (MLP, 3 epochs, best of lr 1e-3 / 1e-2 / 1e-1)")
    for column in ("optimizer", "rule", "best lr", "val acc"):
        table.add_column(column)
    for name in ("sgd", "momentum", "adam", "rmsprop", "powersign", "addsign", "powersign-ld"):
        acc, lr = max((_train(name, lr, data), lr) for lr in (1e-3, 1e-2, 1e-1))
        table.add_row(name, BUILTINS[name], f"{lr:g}", f"{acc:.3f}")
    console.print(table)
    console.print("Any rule is a torch optimizer: "
                  "SymbolicOptimizer(model.parameters(), \"g * exp(sign(g) * sign(m))\", lr=1e-3)")
