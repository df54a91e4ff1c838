"""The CUDA path: the optimizer, the protocol, the stacked sweep and packs on a GPU.

CI is CPU-only: without a CUDA device every test here skips, saying so. The
tasks are synthetic (random inputs, labels from a fixed random teacher), so
the module needs no data files; the convnet task brings batch norm. It
needs nothing but torch, pytest and nos, and runs without the suite's
conftest (which imports the storage stack) on a machine that has only those:

    python -m pytest --noconftest tests/test_cuda.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import stack_module_state

from nos.devices import device_problem
from nos.optim import SymbolicOptimizer
from nos.tasks import evaluate_rule
from nos.tasks.networks import paper_convnet
from nos.tasks.packed import evaluate_rules
from nos.tasks.stacking import stacked_forward

from helpers.evaluations import assert_same, synthetic_task, without_times

pytestmark = pytest.mark.skipif(device_problem("cuda") is not None,
                                reason=f"CUDA tests need a GPU: {device_problem('cuda')}")

# Rules without noise (CPU and CUDA generators draw different numbers): moments, signs, a schedule, weights.
DETERMINISTIC = ("sgd", "adam", "powersign", "addsign-ld", "rmsprop", "clip(g, 1e-3) + 1e-3*w", "g^3 / (v + 1)")
THREE = ("drop(g, 0.1) * exp(1e-3*w)", "addsign-ld", "log(g - g)")
# A stacked and a lone convnet differ in rounding only; TF32 (cuDNN's default for convolutions on
# Ampere and later) rounds to 10 bits, which a sign rule at a large rate amplifies past any fair
# margin within 32 steps (seen on an H200: train losses 2% apart). The comparisons below run in
# full float32, as on the CPU; the convnet keeps a wider margin for cuDNN's other algorithms.
MARGINS = {"mlp": dict(acc=0.02, loss=2e-3), "convnet": dict(acc=0.04, loss=2e-2)}


@pytest.fixture
def float32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _steps(device: str, rule: str, rates: torch.Tensor | None = None, steps: int = 20) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    shape = (3, 40, 30) if rates is not None else (40, 30)
    weight = torch.randn(shape, generator=gen).to(device).requires_grad_()
    optimizer = SymbolicOptimizer([weight], rule, lr=1.0 if rates is not None else 1e-2, total_steps=steps,
                                  seed=0, rates=None if rates is None else rates.to(device))
    for _ in range(steps):
        weight.grad = torch.randn(shape, generator=gen).to(device)
        optimizer.step()
    return weight.detach().cpu()


@pytest.mark.parametrize("rule", DETERMINISTIC)
def test_the_optimizer_on_cuda_moves_as_on_the_cpu(rule):
    torch.testing.assert_close(_steps("cuda", rule), _steps("cpu", rule), rtol=1e-5, atol=1e-6)
    rates = torch.tensor([1e-3, 1e-2, 1e-1])   # a stack's children, one rate each
    torch.testing.assert_close(_steps("cuda", rule, rates), _steps("cpu", rule, rates), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule, compile", [
    ("powersign-ld", True), ("powersign-ld", {}),
    ("powersign-ld", {"mode": "reduce-overhead"}), ("adam", {"mode": "reduce-overhead"}),
    ("clip(g, 1e-3) + 1e-3*w", True)],
    ids=["flat", "inductor-defaults", "cudagraphs", "adam-cudagraphs", "reads-w-per-tensor"])
def test_the_compiled_step_on_cuda_moves_as_the_eager_one(rule, compile):
    gen = torch.Generator().manual_seed(0)
    shapes = [(40, 30), (30,), (8, 3, 3, 3)]
    weights = [[torch.randn(s, generator=gen).cuda().requires_grad_() for s in shapes] for _ in range(2)]
    for w, c in zip(*weights):
        w.data.copy_(c.data)
    eager, compiled = (SymbolicOptimizer(ws, rule, lr=1e-2, total_steps=5, compile=flag)
                       for ws, flag in zip(weights, (False, compile)))
    for _ in range(5):
        for w, c in zip(*weights):
            w.grad = c.grad = torch.randn(w.shape, generator=gen).cuda()
        eager.step()
        compiled.step()
    for w, c in zip(*weights):   # Triton's kernels may round sqrt and division differently from eager ones
        torch.testing.assert_close(c.detach(), w.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule, compile", [
    ("powersign", False), ("adam", False), ("addsign-ld", False), ("g + eps", False),
    ("powersign-ld", True), ("powersign", {"mode": "reduce-overhead"})],
    ids=["powersign", "adam", "addsign-ld", "noise", "compiled", "cudagraphs"])
def test_a_step_on_cuda_never_waits_for_the_gpu(rule, compile):
    """The host queues a step and goes on: no op of it reads a value back (which would wait for the device)."""
    weights = [torch.randn(s, device="cuda").requires_grad_() for s in [(40, 30), (30,), ()]]
    opt = SymbolicOptimizer(weights, rule, lr=1e-2, total_steps=10, compile=compile)
    grads = [[torch.randn_like(w) for w in weights] for _ in range(6)]
    for step, gs in enumerate(grads):
        for w, g in zip(weights, gs):
            w.grad = g
        opt.param_groups[0]["lr"] = 1e-2 * (step + 1)
        if step < 3:   # state, compilation and capture first
            opt.step()
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(w).all() for w in weights)


def test_the_optimizers_noise_on_cuda_repeats_from_its_seed():
    for rule in ("drop(g, 0.3)", "g + eps", "sign(g) * eps_t"):
        assert torch.equal(_steps("cuda", rule), _steps("cuda", rule))


@pytest.mark.parametrize("child", ["mlp", "convnet"])
def test_evaluate_rule_on_cuda_is_deterministic(child):
    task = synthetic_task(child, "cuda")
    for rule in ("adam", "drop(g, 0.1) * exp(1e-3*w)"):
        first, second = evaluate_rule(rule, task, seed=3), evaluate_rule(rule, task, seed=3)
        assert without_times(first) == without_times(second)
        assert not first.diverged


def test_an_evaluation_on_cuda_leaves_the_global_generators_alone():
    task = synthetic_task("mlp", "cuda")
    torch.manual_seed(11)
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state()
    evaluate_rule("drop(g, 0.1)", task, seed=3)
    assert torch.equal(torch.get_rng_state(), cpu)
    assert torch.equal(torch.cuda.get_rng_state(), cuda)


@pytest.mark.parametrize("child", ["mlp", "convnet"])
def test_the_stacked_sweep_on_cuda_agrees_with_one_child_at_a_time(child, float32):
    stacked, sequential = (synthetic_task(child, "cuda", stacked=flag) for flag in (True, False))
    for rule in ("sgd", "powersign", "drop(g, 0.1) * exp(1e-3*w)", "addsign-ld"):
        assert_same(evaluate_rule(rule, stacked, seed=2), evaluate_rule(rule, sequential, seed=2), **MARGINS[child])


@pytest.mark.parametrize("child", ["mlp", "convnet"])
def test_a_pack_on_cuda_agrees_with_one_rule_at_a_time(child, float32):
    packed_task, alone_task = synthetic_task(child, "cuda"), synthetic_task(child, "cuda", stacked=False)
    packed = evaluate_rules(THREE, packed_task, seed=2)
    for a, rule in zip(packed, THREE):
        assert_same(a, evaluate_rule(rule, alone_task, seed=2), **MARGINS[child])
    assert packed[2].diverged and not packed[0].diverged
    assert packed[0].device == "cuda"


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_a_stacks_forward_on_cuda_computes_as_on_the_cpu(memory_format, float32):
    """The stack's written-out forward (nos.tasks.stacking), channels-last images included (vmap refuses
    batch norm on those on CUDA): outputs, gradients and batch norm's running statistics as on the CPU."""
    children = [paper_convnet(3, 16, filters=8) for _ in range(4)]
    params, buffers = stack_module_state(children)
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    forward = stacked_forward(copy.deepcopy(children[0]).to("meta"))
    found = []
    for device in ("cpu", "cuda"):
        # copy=True: to its own device `.to` hands back the tensor itself, whose running statistics batch
        # norm then moves in place, so the CUDA pass would start from what the CPU pass had left.
        p = {n: t.detach().to(device, copy=True).requires_grad_() for n, t in params.items()}
        b = {n: t.to(device, copy=True) for n, t in buffers.items()}
        out = forward(p, b, x.to(device, copy=True).contiguous(memory_format=memory_format))
        (out * out).sum().backward()
        found.append(([out.detach().cpu(), *(t.cpu() for t in b.values())], [t.grad.cpu() for t in p.values()]))
    (values, grads), (cuda_values, cuda_grads) = found
    for on_cpu, on_cuda in zip(values, cuda_values):
        torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-4, atol=1e-4)
    # A gradient sums thousands of products: float32 alone puts the CPU's up to half of 1e-4 from the
    # exact values (float64) on these, and CUDA rounds its own way again, with cuDNN free to pick any
    # algorithm (Winograd's included), so the two may differ by more than 1e-4 without a fault.
    for on_cpu, on_cuda in zip(grads, cuda_grads):
        torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-3, atol=1e-3)
