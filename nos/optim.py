"""Any update rule as a drop-in `torch.optim.Optimizer`, and the named built-ins.

    opt = SymbolicOptimizer(model.parameters(), "g * exp(sign(g) * sign(m))", lr=1e-3)

The rule gives delta; each step moves w <- w - lr * delta. Only the moment
buffers the rule reads are kept (PowerSign one per parameter, Adam two), and
a step works on all of a group's tensors at once.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .rules import Node, operands_read, state_buffers, to_text
from .rules.builtins import BUILTINS, resolve_rule  # noqa: F401  (BUILTINS: part of nos.optim's API)
from .rules.elementwise import step_one
from .rules.foreach import Scratch, StepContext, apply_update, operand_uses, step_numbers, update_moments
from .rules.tree import is_random


class SymbolicOptimizer(torch.optim.Optimizer):
    """Train with an update rule written in nos's rule language.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        rule: rule text (`"g * exp(sign(g) * sign(m))"`), a built-in name
            (`"powersign"`), or a parsed tree.
        lr: learning rate; w <- w - lr * delta.
        total_steps: the horizon T of the schedules `ld`, `cd`, `rd`; required
            when the rule reads one of them.
        foreach: work on all tensors of a group at once (default). False runs
            the same ops one tensor at a time.
        compile: fuse the step with `torch.compile` (pays for large models;
            the first step compiles for tens of seconds): True (inductor's
            combo kernels: few launches for many tensors), or a dict of
            `torch.compile`'s own keyword arguments, e.g. `{}` for its
            defaults or `{"mode": "reduce-overhead"}` for CUDA graphs.
        seed: seeds the optimizer's own generator for `eps`, `eps_t` and
            `drop`; its state travels in `state_dict`, so a resumed run draws
            the same noise it would have drawn.
        rates: one learning rate per slice along dim 0 of every parameter,
            for a stack of networks trained at once (`nos.tasks.stacked`):
            slice k moves by lr * rates[k] * delta. Needs the foreach step.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        rule: str | Node,
        lr: float = 1e-3,
        *,
        total_steps: int | None = None,
        foreach: bool = True,
        compile: bool | dict[str, Any] = False,
        seed: int | None = None,
        rates: Tensor | None = None,
    ):
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"Invalid learning rate: {lr}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        if rates is not None and (_compile_arguments(compile) is not None or not foreach):
            raise ValueError("per-slice rates need the foreach step (foreach=True, compile=False)")
        self.rule = resolve_rule(rule)
        self.rule_text = to_text(self.rule)
        self._reads = operands_read(self.rule)
        self._buffers = state_buffers(self.rule)
        self._uses = operand_uses(self.rule)
        self._random = is_random(self.rule)
        self._seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self.rates = rates
        # CPU temporaries live from step to step: fresh ones cost more in page
        # faults than the ops that fill them (CUDA's caching allocator does this itself).
        self._scratch = Scratch()
        super().__init__(params, dict(lr=lr, total_steps=total_steps, foreach=foreach))
        for group in self.param_groups:   # fail now, not at the first step
            step_numbers(1, group["total_steps"], self._reads)
        # compile traces the plain per-tensor step for the whole bucket into one graph: each
        # parameter's moments, rule and update become one kernel (combo kernels: one launch for many).
        arguments = _compile_arguments(compile)
        self._compiled = None if arguments is None else torch.compile(self._step_each, **arguments)
        # CUDA graphs (these modes) replay fixed addresses: parameters, moments and the step's numbers stay put.
        self._static = arguments is not None and arguments.get("mode") in ("reduce-overhead", "max-autotune")
        self._held: dict[str, dict[str, Tensor]] = {}   # the compiled step's numbers, by device

    def __repr__(self) -> str:
        return f"SymbolicOptimizer({self.rule_text!r}, lr={self.defaults['lr']})"

    # -- state ---------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator | None:
        if not self._random:
            return None
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._generators[key] = gen
        return self._generators[key]

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            for buf in self._buffers:
                state[buf] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self._static:
                for t in [p, *(state[buf] for buf in self._buffers)]:
                    torch._dynamo.mark_static_address(t)
        return state

    def noise_state(self) -> dict[str, Tensor]:
        """The state of the noise generators, by device (empty for a rule that draws no noise)."""
        return {dev: gen.get_state() for dev, gen in self._generators.items()}

    def set_noise_state(self, states: dict[str, Tensor]) -> None:
        """Continue the noise where `noise_state()` left it (another optimizer's: a child taken out of a stack)."""
        for dev, gen_state in states.items():
            gen = self._generator(torch.device(dev))
            if gen is not None:
                gen.set_state(gen_state.cpu())

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["rule"] = self.rule_text
        sd["generators"] = self.noise_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rule = state_dict.pop("rule", None)
        if rule is not None and rule != self.rule_text:
            raise ValueError(f"state_dict was saved for rule {rule!r}, this optimizer runs {self.rule_text!r}")
        generators = state_dict.pop("generators", {})
        super().load_state_dict(state_dict)
        self.set_noise_state(generators)

    # -- the step ------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SymbolicOptimizer does not support sparse gradients; "
                                       "use dense gradients (e.g. nn.Embedding(sparse=False))")
                state = self._init_state(p)
                state["step"] += 1
                buckets[(p.device, p.dtype, state["step"])].append(p)
            for (device, _, step), params in buckets.items():
                numbers = step_numbers(step, group["total_steps"], self._reads)
                generator = self._generator(device)
                if self._compiled is not None:
                    held = self._numbers_on(device, numbers, group["lr"])
                    self._compiled(params, self._buffers_of(params), {k: held[k] for k in numbers}, held["lr"],
                                   generator)
                elif not group["foreach"]:
                    self._step_each(params, self._buffers_of(params), numbers, group["lr"], generator)
                else:
                    self._foreach(params, numbers, group["lr"], generator)
        return loss

    def _foreach(self, params: list[Tensor], numbers, lr, generator) -> None:
        grads = [p.grad for p in params]
        buffers = {buf: [self.state[p][buf] for p in params] for buf in self._buffers}
        update_moments(buffers, grads)
        if self.rates is None:
            scratch = self._scratch if params[0].device.type == "cpu" else None
            rates = None
        else:   # no scratch: a stack's tensors change shape as its members leave
            scratch, rates = None, [self.rates.view(-1, *[1] * (p.dim() - 1)) for p in params]
        apply_update(self.rule, StepContext(params, grads, buffers, numbers, generator, self._uses, scratch, rates),
                     lr)

    def _numbers_on(self, device: torch.device, numbers: dict[str, float], lr: float) -> dict[str, Tensor]:
        """The step's numbers and lr as tensors on `device`, refilled in place each step.

        Tensors, not floats, or the compiled step would recompile as they change; on the
        parameters' device, so that a kernel reads them without a copy from the host; the same
        tensors every step, so that a CUDA graph finds them where it captured them.
        """
        held = self._held.setdefault(str(device), {})
        for name, value in dict(numbers, lr=lr).items():
            if name not in held:
                held[name] = torch.zeros((), dtype=torch.float64, device=device)
                if self._static:
                    torch._dynamo.mark_static_address(held[name])
            held[name].fill_(value)
        return held

    def _buffers_of(self, params: list[Tensor]) -> list[dict[str, Tensor]]:
        return [{buf: self.state[p][buf] for buf in self._buffers} for p in params]

    def _step_each(self, params, buffers, numbers, lr, generator) -> None:
        for p, bufs in zip(params, buffers):
            step_one(self.rule, p, p.grad, bufs, numbers, lr, generator)


def _compile_arguments(compile: bool | dict[str, Any] | None) -> dict[str, Any] | None:
    """torch.compile's keyword arguments for `compile`, or None for no compilation."""
    if compile is False or compile is None:
        return None
    if compile is True:
        # Combo kernels launch many parameters' kernels as one: on an H200, PowerSign's compiled
        # step on ResNet-18 took 0.76 ms with them, 1.23 ms with inductor's defaults (docs/benchmarks.md).
        return {"options": {"combo_kernels": True}}
    if isinstance(compile, dict):
        return compile
    raise TypeError(f"compile must be True, False or a dict of torch.compile's arguments, got {compile!r}")
