"""A rule as a short Python snippet that trains with it in any PyTorch loop.

    print(export_snippet("powersign", lr=0.1))

The snippet imports only torch and `nos.optim.SymbolicOptimizer`; the rule is
written in its canonical text, and running the snippet as a script fits a
small linear regression as a quick check. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import numbers

from nos.rules import Node, operands_read, to_text
from nos.rules.builtins import BUILTINS, resolve_rule
from nos.rules.tree import is_random
from nos.rules.vocabulary import SCHEDULES

DEMO_STEPS = 200


def export_snippet(rule: str | Node, *, lr: float = 1e-3, total_steps: int | None = None, seed: int | None = None,
                   demo: bool = True, lr_note: str | None = None) -> str:
    """Python source that builds a `SymbolicOptimizer` for `rule` (text, built-in name or tree).

    lr_note: where the rate comes from, written beside it as a comment (one line).

    Raises `RuleSyntaxError` (a ValueError) for bad rule text, ValueError for a
    bad learning rate or step count.
    """
    # inf or nan would print as names the snippet cannot resolve; text (a damaged stored rate) as code
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 < lr < math.inf:
        raise ValueError(f"the learning rate must be positive and finite, got {lr!r:.60}")
    if total_steps is not None and total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    tree = resolve_rule(rule)
    text = to_text(tree)
    name = rule.strip().lower() if isinstance(rule, str) and rule.strip().lower() in BUILTINS else None
    schedules = [s for s in SCHEDULES if s in operands_read(tree)]
    needs_horizon = bool(schedules) and total_steps is None

    lines = [
        f"# {'The built-in rule ' + name if name else 'An update rule'} from nos (Neural Optimizer Search):",
        f"#     delta = {text}",
        "# each step moves every parameter w <- w - lr * delta. Needs torch and nos installed.",
        *(["import torch", ""] if demo else []),
        "from nos.optim import SymbolicOptimizer",
        "",
        f"RULE = {json.dumps(text)}",
        f"LR = {lr!r}" + (f"   # {' '.join(lr_note.split())}" if lr_note else ""),
    ]
    args = ["params", "lr=LR"]
    call = ["params", "RULE", "lr=lr"]
    if schedules:
        lines.append(f"TOTAL_STEPS = {total_steps!r}" if total_steps is not None else
                     f"# The rule reads the schedule{'s' if len(schedules) > 1 else ''} {', '.join(schedules)}: "
                     "pass total_steps, the training run's length in optimizer steps.")
        args.append("total_steps=TOTAL_STEPS" if total_steps is not None else "total_steps=None")
        call.append("total_steps=total_steps")
    if seed is not None or is_random(tree):
        lines.append(f"SEED = {seed!r}   # seeds the rule's noise (eps, eps_t, drop); None: made from "
                     "torch.initial_seed(), so torch.manual_seed repeats it")
        args.append("seed=SEED")
        call.append("seed=seed")
    lines += [
        "",
        "",
        f"def make_optimizer({', '.join(args)}):",
        '    """A torch.optim.Optimizer that trains `params` with RULE."""',
        f"    return SymbolicOptimizer({', '.join(call)})",
    ]
    if demo:
        steps_arg = f", total_steps={DEMO_STEPS}" if needs_horizon else ""
        lines += [
            "",
            "",
            'if __name__ == "__main__":',
            "    # A quick check: fit a small linear regression, print the loss before and after.",
            "    torch.manual_seed(0)",
            "    x = torch.randn(256, 8)",
            "    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(256, 1)",
            "    model = torch.nn.Linear(8, 1)",
            f"    optimizer = make_optimizer(model.parameters(){steps_arg})",
            "    losses = []",
            f"    for step in range({DEMO_STEPS}):",
            "        optimizer.zero_grad()",
            "        loss = torch.nn.functional.mse_loss(model(x), y)",
            "        loss.backward()",
            "        optimizer.step()",
            "        losses.append(loss.item())",
            '    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} after {len(losses)} steps at lr {LR}")',
        ]
    return "\n".join(lines) + "\n"


__all__ = ["export_snippet"]
