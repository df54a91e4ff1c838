"""Any update rule as a drop-in `torch.optim.Optimizer`, and the named built-ins.

    opt = SymbolicOptimizer(model.parameters(), "g * exp(sign(g) * sign(m))", lr=1e-3)

The rule gives delta; each step moves w <- w - lr * delta. Only the moment
buffers the rule reads are kept (PowerSign one per parameter, Adam two), and
a step works on all of a group's tensors at once.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import count, repeat
from operator import attrgetter, is_, is_not, itemgetter
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import optimizer as torch_optimizer

from .rules import Node, operands_read, state_buffers, to_text
from .rules.builtins import BUILTINS, resolve_rule  # noqa: F401  (BUILTINS: part of nos.optim's API)
from .rules.elementwise import change_one, numbers_read, step_one, update_moments_one
from .rules.foreach import Scratch, StepContext, TreeFacts, apply_update, operand_uses, step_numbers, update_moments
from .rules.tree import is_random
from .rules.vocabulary import WEIGHT_SCALES

# Devices whose compiled step runs over flat tensors (SymbolicOptimizer._flatten). Three inputs per
# parameter cost a GPU step more host time, in guards and wrappers, than its kernels take; on a CPU the
# two copies it adds cost more than that (ResNet-18, 2 cores: 17.3 ms a step flat against 12.0).
FLAT_DEVICES = ("cuda", "xpu", "mps")

# Devices whose per-slice rates (a stack's, see `rates`) are kept at each parameter's full shape. A
# foreach kernel launches once for all its tensors only when every list's tensors match in shape (else
# it launches per tensor, which on a GPU costs a pack host time per rule); the price is one tensor the
# size of the parameters. A CPU has no fused foreach kernels, so there the rates stay views.
FULL_RATE_DEVICES = ("cuda",)

# Where torch keeps the step hooks registered for every optimizer, and for one (see step_together).
_GLOBAL_HOOKS = ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
_OWN_HOOKS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")

# torch.optim's hyperparameters that a rule has no place for: a param group that sets one would train as if
# it did not, so it is refused (the rule itself can hold them: weight decay 1e-2 is "<rule> + 1e-2*w").
UNSUPPORTED_GROUP_KEYS = ("weight_decay", "maximize", "betas", "momentum", "dampening", "nesterov", "eps", "amsgrad")

# What a state dict carries besides torch's "state" and "param_groups": at the top, as nos always saved it, and
# in the param groups ("rule" in each, the noise in the first), which torch.distributed.checkpoint keeps.
_SAVED_KEYS = ("rule", "seed", "generators")

_IS_SPARSE = attrgetter("is_sparse")
_STEP = itemgetter("step")


class SymbolicOptimizer(torch.optim.Optimizer):
    """Train with an update rule written in nos's rule language.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        rule: rule text (`"g * exp(sign(g) * sign(m))"`), a built-in name
            (`"powersign"`), or a parsed tree.
        lr: learning rate; w <- w - lr * delta.
        total_steps: the horizon T of the schedules `ld`, `cd`, `rd`; required
            when the rule reads one of them.
        foreach: work on all tensors of a group at once (True or None, the
            default). False runs the same ops one tensor at a time.
        compile: fuse the step with `torch.compile` (pays for large models;
            the first step compiles for tens of seconds): True (inductor's
            combo kernels: few launches for many tensors), or a dict of
            `torch.compile`'s own keyword arguments, e.g. `{}` for its
            defaults or `{"mode": "reduce-overhead"}` for CUDA graphs.
        seed: seeds the optimizer's own generator for `eps`, `eps_t` and
            `drop`; it and the generator's state travel in `state_dict`, so a
            resumed run draws the same noise it would have drawn. None: one
            made from `torch.initial_seed()` (see `_default_seed`), which
            leaves torch's global generator as it was.
        rates: one learning rate per slice along dim 0 of every parameter,
            for a stack of networks trained at once (`nos.tasks.stacked`):
            slice k moves by lr * rates[k] * delta. Needs the foreach step.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        rule: str | Node,
        lr: float | Tensor = 1e-3,
        *,
        total_steps: int | None = None,
        foreach: bool | None = True,
        compile: bool | dict[str, Any] = False,
        seed: int | None = None,
        rates: Tensor | None = None,
    ):
        tree = resolve_rule(rule)
        if rates is not None and (_compile_arguments(compile) is not None or _per_tensor(foreach)):
            raise ValueError("per-slice rates need the foreach step (foreach=True, compile=False)")
        if seed is None and is_random(tree):
            seed = _default_seed()
        self._setup(tree, None if seed is None else int(seed), compile, rates)
        defaults = dict(lr=lr, total_steps=total_steps, foreach=foreach)
        self._check_group(defaults)   # fail now, not at the first step: the groups are checked as they are added
        super().__init__(params, defaults)
        self.state = _State(dict)
        # First, so that hooks registered later see what it adds.
        self.register_state_dict_post_hook(_with_rule_and_noise)

    def _setup(self, rule: Node, seed: int | None, compile: bool | dict[str, Any], rates: Tensor | None) -> None:
        """What the optimizer works out from its arguments: at construction, and again for a copy or unpickling."""
        self.rule = rule
        self.rule_text = to_text(self.rule)
        self._reads = operands_read(self.rule)
        self._buffers = state_buffers(self.rule)
        self._uses = operand_uses(self.rule)
        self._facts = TreeFacts()   # what each step asks of the tree, worked out at the first
        self._random = is_random(self.rule)
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._noise_waiting: dict[str, Tensor] = {}   # generator states for devices whose generator is not made yet
        self.rates = rates
        # CPU temporaries live from step to step: fresh ones cost more in page
        # faults than the ops that fill them (CUDA's caching allocator does this itself).
        self._scratch = Scratch()
        # compile traces the plain per-tensor step into one graph, fused by inductor. On a GPU a
        # rule that reads neither w nor noise is traced over flat tensors instead (see _flatten).
        self._compile = compile
        arguments = _compile_arguments(compile)
        self._compiled = None if arguments is None else torch.compile(self._step_each, **arguments)
        self._compiled_flat = None if arguments is None else torch.compile(self._step_flat, **arguments)
        self._flat_devices = FLAT_DEVICES if not (self._random or self._reads.intersection(WEIGHT_SCALES)) else ()
        # CUDA graphs (these modes) replay fixed addresses: parameters, moments and the step's numbers stay put.
        self._static = arguments is not None and arguments.get("mode") in ("reduce-overhead", "max-autotune")
        self._numbers = numbers_read(self._reads)   # what the compiled step takes of step_numbers
        self._held: dict[str, tuple[dict[str, Tensor], Tensor]] = {}   # the compiled step's numbers and lr, by device
        self._filled: dict[str, dict[str, float]] = {}   # the values last put in them
        self._plans: dict[int, tuple] = {}   # each group's buckets (see _buckets)
        # The self.state the plans were made from, and its count of changes then (see _State).
        self._tracked: _State | None = None
        self._version = -1

    def __getstate__(self) -> dict[str, Any]:
        # torch's keeps only defaults, state and param_groups: a copy or an unpickled optimizer needs the rest.
        state = super().__getstate__()
        state["nos"] = {"rule": self.rule, "seed": self._seed, "compile": self._compile, "rates": self.rates,
                        "noise": self.noise_state()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also called by torch's load_state_dict, with the loaded state and param groups alone.
        state = dict(state)
        ours = state.pop("nos", None)
        super().__setstate__(state)
        if ours is not None:   # copied or unpickled: the compiled steps and caches are made anew
            self._setup(ours["rule"], ours["seed"], ours["compile"], ours["rates"])
            self.register_state_dict_post_hook(_with_rule_and_noise)
            self.set_noise_state(ours["noise"])
        self._track()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):   # else torch's own TypeError
            self._check_group({**self.defaults, **param_group}, given=param_group)
        super().add_param_group(param_group)

    def _check_group(self, group: dict[str, Any], given: Iterable[str] = ()) -> None:
        """Refuse a group's hyperparameters now, not at a step that has moved the groups before it."""
        for key in given:
            if key in UNSUPPORTED_GROUP_KEYS:
                raise ValueError(f"a param group sets {key!r}, a torch.optim hyperparameter SymbolicOptimizer does "
                                 "not implement: write it into the rule instead (decoupled weight decay 1e-2, "
                                 "as AdamW's or plain SGD's: '<rule> + 1e-2*w')")
        _check_lr(group["lr"])
        total_steps = group["total_steps"]
        if total_steps is not None and not (_is_real(total_steps) and total_steps >= 1):
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        step_numbers(1, total_steps, self._reads)   # a rule that reads a schedule needs a horizon
        if group["foreach"] not in (True, False, None):
            raise ValueError(f"foreach must be True, False or None, got {group['foreach']!r}")
        # The per-tensor step has no rates: a group of its own would step every slice alike.
        if self.rates is not None and _per_tensor(group["foreach"]):
            raise ValueError("per-slice rates need the foreach step: a param group cannot set foreach=False")

    def __repr__(self) -> str:
        # torch's, which lists the groups as they are now (lr as a scheduler left it), with the rule.
        name = type(self).__name__
        return super().__repr__().replace(name, f"{name}({self.rule_text!r})", 1)

    # -- state ---------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator | None:
        if not self._random:
            return None
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            waiting = self._noise_waiting.pop(key, None)
            if waiting is not None:
                gen.set_state(waiting)
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
        else:   # a step put there may be torch's kind, a tensor
            state["step"] = _step_count(state["step"])
        return state

    def noise_state(self) -> dict[str, Tensor]:
        """The state of the noise generators, by device (empty for a rule that draws no noise)."""
        return {**self._noise_waiting, **{dev: gen.get_state() for dev, gen in self._generators.items()}}

    def set_noise_state(self, states: dict[str, Tensor]) -> None:
        """Continue the noise where `noise_state()` left it (another optimizer's: a child taken out of a stack).

        A device's generator is made when a tensor there first steps, and takes its state then: a state for
        a device this optimizer has no tensors on (a GPU's, on a machine without one) waits unused. One saved
        on a device no tensor is on goes to the tensors' device of its type that has none, if there is just
        one (a run saved on one GPU, resumed on another).
        """
        if not self._random:
            return
        for dev, gen_state in _moved_to(states, self._devices()).items():
            if dev in self._generators:
                self._generators[dev].set_state(gen_state.cpu())
            else:
                self._noise_waiting[dev] = gen_state.cpu()

    def _devices(self) -> list[str]:
        return list(dict.fromkeys(str(p.device) for group in self.param_groups for p in group["params"]))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict, saved = _without_ours(state_dict)
        rules = saved["rule"]
        if not rules:   # another optimizer's (torch.optim.Adam's): its state is not what the rule reads
            raise ValueError("state_dict has no 'rule': it was not saved by a SymbolicOptimizer")
        for rule in rules:
            if rule != self.rule_text:
                raise ValueError(f"state_dict was saved for rule {rule!r}, this optimizer runs {self.rule_text!r}")
        for group in state_dict["param_groups"]:
            self._check_group(group)
        super().load_state_dict(state_dict)
        seed, generators = saved["seed"], saved["generators"]
        if seed is not None:
            self._seed = seed
        self._generators.clear()   # a generator made before the load would go on from another run's draws
        self._noise_waiting.clear()
        self.set_noise_state(generators)
        self._warn_of_lost_noise(generators, seed is not None)

    def _warn_of_lost_noise(self, generators: dict[str, Tensor], seeded: bool) -> None:
        """Warn where the noise of a resumed run cannot continue as it would have: its state is for other
        devices, or it was saved by an earlier nos without its seed (before the first step: no state at all)."""
        lost = [dev for dev in self._devices() if dev not in self._noise_waiting] if self._random else []
        if lost and (generators or not seeded):
            warnings.warn(f"the state dict holds no noise state for {', '.join(lost)} (it has: "
                          f"{', '.join(generators) or 'none'}): this optimizer's noise there starts again from "
                          "its seed, not where the saved run's was", stacklevel=3)

    def _track(self) -> None:
        """Take self.state as the plans' source: as a _State, which counts its changes (torch's load_state_dict,
        or a user, may have put a plain dict in its place)."""
        if not isinstance(self.state, _State):
            self.state = _State(dict, self.state)
        self._tracked = self.state
        self._plans.clear()   # they hold the tensors of the state that was

    # -- the step ------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if _compiling():
            # Inside a torch.compile of a whole training step: traced, the step's per-step numbers (a tensor
            # lr read as a float, bias corrections) made a new graph at every step until dynamo gave up after
            # its recompile limit. Run eagerly instead, as one break in the graph (`compile=True` compiles it).
            torch.compiler.disable(self._step_groups)()
        else:
            self._step_groups()
        return loss

    def _step_groups(self) -> None:
        tracked = self.state
        if tracked is not self._tracked or tracked.version != self._version:   # a state dict put, replaced or gone
            self._track()
        for index, group in enumerate(self.param_groups):
            lr = group["lr"]
            if type(lr) is not float:   # a tensor (as torch's optimizers take it, a scheduler fills it), a NumPy number
                lr = float(lr)
            grads = [p.grad for p in group["params"]]   # read once: a tensor's .grad costs more than a dict lookup
            for bucket in self._buckets(index, group["params"], grads):
                self._step_bucket(bucket, grads if bucket.whole else [grads[i] for i in bucket.indices], group, lr)
        self._scratch.trim()
        self._version = self.state.version

    def _step_bucket(self, bucket: _Bucket, grads: list[Tensor], group: dict[str, Any], lr: float) -> None:
        if any(map(_IS_SPARSE, grads)):   # here, not where buckets are made: a kept plan looks at no gradient
            raise RuntimeError("SymbolicOptimizer does not support sparse gradients; "
                               "use dense gradients (e.g. nn.Embedding(sparse=False))")
        step = bucket.step + 1
        for state in bucket.states:
            state["step"] = step
        bucket.step = step
        numbers = step_numbers(step, group["total_steps"], self._reads)
        generator = self._generator(bucket.device)
        if self._compiled is not None:
            self._step_compiled(bucket, grads, numbers, lr, generator)
        elif _per_tensor(group["foreach"]):
            self._step_each(bucket.params, grads, bucket.buffers, numbers, lr, generator)
        else:
            self._foreach(bucket, grads, numbers, lr, generator)

    def _buckets(self, index: int, params: list[Tensor], grads: list[Tensor | None]) -> list[_Bucket]:
        """The group's tensors that have gradients, bucketed by device, dtype and step count.

        Kept from step to step while the same tensors have gradients and each one's state holds
        what it held (see _Bucket.intact): the per-tensor bookkeeping cost more host time than a
        large model's whole step on a GPU.
        """
        # The group's tensors by identity, and which have gradients (a tensor that steps is held by the plan,
        # so its id is not reused while the plan is kept).
        stepping = (tuple(map(id, params)), tuple(map(is_not, grads, repeat(None))))
        kept = self._plans.get(index)
        if kept is not None and kept[0] == stepping and all(map(_Bucket.intact, kept[1])):
            return kept[1]
        buckets: dict[tuple, _Bucket] = {}
        for i, (p, steps) in enumerate(zip(params, stepping[1])):
            if not steps:
                continue
            if p.is_complex():
                raise RuntimeError(f"SymbolicOptimizer does not support complex parameters (one is {p.dtype}): "
                                   "keep it as a real parameter of its real and imaginary parts, and "
                                   "torch.view_as_complex it in the forward")
            state = self._init_state(p)
            key = (p.device, p.dtype, state["step"])
            if key not in buckets:
                buckets[key] = _Bucket(p.device, [], [], {buf: [] for buf in self._buffers}, step=state["step"])
            bucket = buckets[key]
            bucket.params.append(p)
            bucket.states.append(state)
            bucket.indices.append(i)
            for buf in self._buffers:
                bucket.buffers[buf].append(state[buf])
        for bucket in buckets.values():
            if self._compiled is not None and bucket.device.type in self._flat_devices:
                self._flatten(bucket)
            bucket.hold()
            bucket.whole = bucket.indices == list(range(len(params)))   # its gradients are the group's
        self._plans[index] = (stepping, list(buckets.values()))
        return self._plans[index][1]

    def _flatten(self, bucket: _Bucket) -> None:
        """Each moment buffer of the bucket as views of one tensor, and one tensor to take its gradients.

        The compiled step then takes a few large tensors whatever the number of parameters, so its
        guards, wrappers and launches stop growing with it; the price is a tensor the size of the
        bucket and two passes over it (gradients copied in, changes added to the parameters).
        Done whenever buckets are made, so it also takes in state that load_state_dict brought.
        """
        sizes = [p.numel() for p in bucket.params]
        first = bucket.params[0]

        def views(flat: Tensor) -> list[Tensor]:
            return [piece.view_as(p) for piece, p in zip(flat.split(sizes), bucket.params)]

        for buf, tensors in bucket.buffers.items():
            bucket.flat[buf] = torch.cat([t.reshape(-1) for t in tensors])
            bucket.buffers[buf] = views(bucket.flat[buf])
            for state, view in zip(bucket.states, bucket.buffers[buf]):
                state[buf] = view
        bucket.grad = first.new_empty(sum(sizes))
        bucket.grad_views = views(bucket.grad)
        if self._static:
            for t in [bucket.grad, *bucket.flat.values()]:
                torch._dynamo.mark_static_address(t)

    def _step_compiled(self, bucket: _Bucket, grads: list[Tensor], numbers, lr, generator) -> None:
        held, lr = self._numbers_on(bucket.device, numbers, lr)
        if bucket.grad is None:
            self._compiled(bucket.params, grads, bucket.buffers, held, lr, generator)
            return
        torch._foreach_copy_(bucket.grad_views, grads)
        self._compiled_flat(bucket.grad, bucket.flat, held, lr)   # leaves each parameter's change in grad
        torch._foreach_add_(bucket.params, bucket.grad_views)

    def _foreach(self, bucket: _Bucket, grads: list[Tensor], numbers, lr, generator) -> None:
        update_moments(bucket.buffers, grads)
        if self.rates is None:
            scratch = self._scratch if bucket.device.type == "cpu" else None
            rates = None
        else:   # no scratch: a stack's tensors change shape as its members leave
            # Kept from step to step, and made again if the rates are replaced or changed in place.
            kept = bucket.rates
            if kept is None or kept[0] is not self.rates or kept[1] != self.rates._version:
                bucket.rates = (self.rates, self.rates._version, self._shaped_rates(bucket.params))
            scratch, rates = None, bucket.rates[2]
        apply_update(self.rule, StepContext(bucket.params, grads, bucket.buffers, numbers, generator, self._uses,
                                            scratch, rates, self._facts), lr)

    def _shaped_rates(self, params: list[Tensor]) -> list[Tensor]:
        """`rates` shaped to multiply each parameter: views that broadcast, or full copies (FULL_RATE_DEVICES)."""
        views = [self.rates.view(-1, *[1] * (p.dim() - 1)) for p in params]
        if params[0].device.type not in FULL_RATE_DEVICES:
            return views
        return [torch.empty_like(p).copy_(view.expand_as(p)) for p, view in zip(params, views)]

    def _numbers_on(self, device: torch.device, numbers: dict[str, float],
                    lr: float) -> tuple[dict[str, Tensor], Tensor]:
        """The step numbers the rule reads, and lr, as tensors on `device`, refilled in place when they change.

        Tensors, not floats, or the compiled step would recompile as they change; on the
        parameters' device, so that a kernel reads them without a copy from the host; the same
        tensors every step, so that a CUDA graph finds them where it captured them. One element,
        not 0-dim: dynamo takes a 0-dim tensor for a number and guards on its value with `.item()`
        at every call, which on a GPU waits for the device.
        """
        key = str(device)
        if key not in self._held:
            tensors = {name: torch.zeros(1, dtype=torch.float64, device=device) for name in (*self._numbers, "lr")}
            if self._static:
                for t in tensors.values():
                    torch._dynamo.mark_static_address(t)
            lr_held = tensors.pop("lr")
            self._held[key], self._filled[key] = (tensors, lr_held), {}
        held, lr_held = self._held[key]
        filled = self._filled[key]

        def fill(name: str, t: Tensor, value: float) -> None:
            if filled.get(name) != value:   # a fill is a kernel launch on a GPU
                t.fill_(value)
                filled[name] = value

        for name, t in held.items():
            fill(name, t, numbers[name])
        fill("lr", lr_held, lr)
        return held, lr_held

    def _step_each(self, params, grads, buffers, numbers, lr, generator) -> None:
        if isinstance(lr, Tensor):   # the compiled step's numbers: see _numbers_on
            lr, numbers = _as_numbers(lr, numbers)
        for i, (p, g) in enumerate(zip(params, grads)):
            step_one(self.rule, p, g, {buf: tensors[i] for buf, tensors in buffers.items()}, numbers, lr, generator)

    def _step_flat(self, grad: Tensor, buffers: dict[str, Tensor], numbers: dict[str, Tensor], lr: Tensor) -> None:
        lr, numbers = _as_numbers(lr, numbers)
        update_moments_one(buffers, grad)
        grad.copy_(change_one(self.rule, grad, buffers, numbers, lr))


def step_together(optimizers: Iterable[SymbolicOptimizer]) -> None:
    """`step()` each of `optimizers`, for a caller that steps dozens of them per training step (a pack's rules).

    One `no_grad` for all, and none of torch's per-call wrapper (a profiler range, hook lookups), which
    cost a small optimizer's step a fifth of its host time. An optimizer with step hooks gets its `step()`.
    """
    global_hooks = _hooked(torch_optimizer, _GLOBAL_HOOKS)
    with torch.no_grad():
        for optimizer in optimizers:
            if global_hooks or _hooked(optimizer, _OWN_HOOKS):
                optimizer.step()
            else:
                optimizer._step_groups()


def _hooked(holder: Any, names: tuple[str, ...]) -> bool:
    """Whether any of the hook dicts `names` of `holder` holds a hook; True where one is missing (an unknown torch)."""
    hooks = [getattr(holder, name, None) for name in names]
    return any(found is None or len(found) > 0 for found in hooks)


def _as_numbers(lr: Tensor, numbers: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """The held one-element tensors as 0-dim ones, which broadcast against a 0-dim parameter too."""
    return lr.view(()), {name: x.view(()) for name, x in numbers.items()}


class _State(defaultdict):
    """`Optimizer.state` that counts its changes, so that a step finds out with one comparison whether any
    parameter's state dict was put, replaced or removed since its plans were made (see _Bucket.intact for
    what a state dict holds). Every way in passes here, defaultdict's insertion of a missing key too."""

    __slots__ = ("version",)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.version = 0

    def __setitem__(self, key: Any, value: Any) -> None:
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self.version += 1
        super().__delitem__(key)

    def __ior__(self, other: Any) -> _State:
        self.version += 1
        return super().__ior__(other)

    def clear(self) -> None:
        self.version += 1
        super().clear()

    def pop(self, *args: Any) -> Any:
        self.version += 1
        return super().pop(*args)

    def popitem(self) -> tuple[Any, Any]:
        self.version += 1
        return super().popitem()

    def setdefault(self, *args: Any) -> Any:
        self.version += 1
        return super().setdefault(*args)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.version += 1
        super().update(*args, **kwargs)


def _with_rule_and_noise(optimizer: SymbolicOptimizer, state_dict: dict[str, Any]) -> None:
    """state_dict's first post-hook: the rule it was saved for, and where the noise stands (see _SAVED_KEYS)."""
    noise = {"seed": optimizer._seed, "generators": optimizer.noise_state()}
    state_dict.update(rule=optimizer.rule_text, **noise)
    for group in state_dict["param_groups"]:   # torch's copies of the groups
        group["rule"] = optimizer.rule_text
    if state_dict["param_groups"]:
        state_dict["param_groups"][0].update(noise)


def _without_ours(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """torch's part of a state dict, and what it says of _SAVED_KEYS: "rule" the rule texts it names (the top
    one, or else those of its groups), "seed" and "generators" the top's, or else the first group's that has one.
    """
    groups = [dict(group) for group in state_dict["param_groups"]]
    found = {key: [group.pop(key) for group in groups if key in group] for key in _SAVED_KEYS}
    saved = {"rule": [state_dict["rule"]] if state_dict.get("rule") is not None else found["rule"]}
    for key, empty in (("seed", None), ("generators", {})):
        top = state_dict.get(key)
        saved[key] = top if top is not None else next((v for v in found[key] if v is not None), empty)
    rest = {k: v for k, v in state_dict.items() if k not in _SAVED_KEYS}
    return {**rest, "param_groups": groups}, saved


def _moved_to(states: dict[str, Tensor], devices: list[str]) -> dict[str, Tensor]:
    """`states` by device, where one for a device not in `devices` moves to the one device of its type there
    that has none (a generator's state is the same on any device of a type, not across types)."""
    states = dict(states)
    for dev in devices:
        kind = torch.device(dev).type
        strays = [d for d in states if d not in devices and torch.device(d).type == kind]
        if dev not in states and len(strays) == 1:
            states[dev] = states.pop(strays[0])
    return states


_default_seeds = count()


def _default_seed() -> int:
    """A seed for a noisy rule given none, made without a draw from torch's global generator.

    A draw would shift every one after it (the data order, dropout masks), and a rule compared with a
    baseline optimizer would see other batches than the baseline saw. From torch.initial_seed(), the
    seed follows torch.manual_seed from one process to the next; with the count of optimizers seeded so
    before it in the process, each gets its own.
    """
    text = f"{torch.initial_seed()}/{next(_default_seeds)}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 2   # below 2**62


def _is_real(value: Any) -> bool:
    """A real number (a NumPy one too, as torch's optimizers take them), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _compiling() -> bool:
    """Whether torch.compile is tracing the caller (False on a torch without torch.compiler.is_compiling)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return is_compiling is not None and is_compiling()


def _check_lr(lr: Any) -> float:
    """lr as a float: a number, or a tensor of one number (as torch's optimizers take it, and schedulers fill it)."""
    if isinstance(lr, Tensor) and lr.numel() == 1 and not lr.is_complex():
        value = float(lr)
    elif _is_real(lr):   # a NumPy number too, as a LambdaLR computing with NumPy leaves in the groups
        value = float(lr)
    else:
        raise ValueError(f"Invalid learning rate: lr must be a number or a one-element tensor, got {lr!r}")
    if not value >= 0:
        raise ValueError(f"Invalid learning rate: {lr}")
    return value


def _step_count(step: Any) -> int:
    """A state's step count as the int a step keeps there. torch's optimizers keep a one-element float tensor,
    and take one put in a state (opt.state[p]["step"] = torch.tensor(3.)): so does this one."""
    if isinstance(step, Tensor) and step.numel() == 1 and not step.is_complex():
        value = step.item()
    elif _is_real(step):
        value = float(step)
    else:
        raise TypeError(f"a state's 'step' is a whole number or a one-element tensor of one, got {step!r}")
    if not (math.isfinite(value) and value >= 0 and float(value).is_integer()):
        raise ValueError(f"a state's 'step' counts the steps taken: a whole number >= 0, got {step!r}")
    return int(value)


def _per_tensor(foreach: bool | None) -> bool:
    """Whether a group's foreach asks for the per-tensor step: None picks the foreach step, as in torch."""
    return foreach is not None and not foreach


@dataclass
class _Bucket:
    """Tensors that step together: one device and dtype, one step count."""

    device: torch.device
    params: list[Tensor]
    states: list[dict[str, Any]]
    buffers: dict[str, list[Tensor]]   # each moment buffer's tensors, in the order of params
    # A flat compiled step's (see SymbolicOptimizer._flatten): buffers and gradients, one tensor each.
    flat: dict[str, Tensor] = field(default_factory=dict)
    grad: Tensor | None = None
    grad_views: list[Tensor] = field(default_factory=list)
    # SymbolicOptimizer.rates, its version counter then, and it shaped to each parameter (_shaped_rates).
    rates: tuple[Tensor, int, list[Tensor]] | None = None
    step: int = 0   # the step count every state of the bucket holds
    indices: list[int] = field(default_factory=list)   # where params stand in their group
    whole: bool = False   # whether params are the group's, in order
    # Each buffer's name as an itemgetter, with the tensors the states held under it (see hold).
    holds: list[tuple[itemgetter, list[Tensor]]] = field(default_factory=list)

    def hold(self) -> None:
        """Note the tensors each state holds now, for intact(): after any _flatten, which puts views in their place."""
        self.holds = [(itemgetter(name), list(tensors)) for name, tensors in self.buffers.items()]

    def intact(self) -> bool:
        """Whether every state still holds this bucket's step count and buffers, not others put in their place
        (state[p]["exp_avg"] = ..., an offload and back): a step must read self.state as torch's optimizers do.

        A pass over the states in C per buffer and one for the step count: 6 microseconds for Adam on
        ResNet-18's 62 tensors (2 cores), a tenth of what building the plan again costs.
        """
        try:
            return (list(map(_STEP, self.states)).count(self.step) == len(self.states)
                    and all(all(map(is_, map(get, self.states), tensors)) for get, tensors in self.holds))
        except (KeyError, RuntimeError):   # a key gone (state[p].clear()), a step that is a tensor of many numbers
            return False   # built again: an emptied state starts afresh, a step is checked


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
