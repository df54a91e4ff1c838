"""A stack's forward written out by hand (nos.tasks.stacking) against vmap's over the same network."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from nos.tasks.networks import digits_mlp, paper_convnet
from nos.tasks.stacking import stacked_forward

K = 3


class _Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def _untracked(norm: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Batch norm that keeps running statistics but no longer tracks them: training leaves them be."""
    norm.track_running_stats = False
    return norm


def _image_nets() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    return {
        "paper convnet": (paper_convnet(3, 8, filters=4), (5, 3, 8, 8)),
        "convs with biases, average pools": (nn.Sequential(
            nn.Conv2d(2, 3, 3, padding="same"), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(3, 4, 3, stride=2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)), (4, 2, 8, 8)),
        "fully convolutional": (nn.Sequential(
            nn.MaxPool2d(2), nn.ReLU(inplace=True), nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, affine=False),
            nn.Conv2d(3, 2, 3, dilation=2, bias=False), nn.BatchNorm2d(2, track_running_stats=False)), (4, 2, 10, 10)),
        "statistics kept, not tracked": (nn.Sequential(
            nn.Conv2d(2, 3, 3), _untracked(nn.BatchNorm2d(3)), nn.Flatten(), nn.Linear(48, 2)), (4, 2, 6, 6)),
    }


def _feature_nets() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    return {
        "digits mlp": (digits_mlp(8), (6, 64)),
        "no biases, features of a sequence": (nn.Sequential(
            nn.Linear(5, 4, bias=False), nn.GELU(), nn.Linear(4, 2)), (3, 7, 5)),
        "flattened input": (nn.Sequential(nn.Flatten(), nn.Linear(12, 3, bias=False)), (2, 3, 4)),
    }


def _stack(net: nn.Module):
    torch.manual_seed(0)
    children = [copy.deepcopy(net) for _ in range(K)]
    for child in children:   # children that differ, as a stack's do once they have trained
        for p in child.parameters():
            p.data.normal_()
    params, buffers = stack_module_state(children)
    return ({n: p.detach().clone().requires_grad_() for n, p in params.items()},
            {n: b.clone() for n, b in buffers.items()})


def _run(forward, params, buffers, x):
    out = forward(params, buffers, x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), {n: p.grad for n, p in params.items()}, buffers


def _compare(net: nn.Module, shape: tuple[int, ...], training: bool, channels_last: bool = False):
    skeleton = copy.deepcopy(net).to("meta").train(training)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    original = x.clone()
    hand = stacked_forward(skeleton)
    assert hand is not None

    def call(params, buffers, x):
        return functional_call(skeleton, (params, buffers), (x,))

    by_vmap = vmap(call, in_dims=(0, 0, None))
    (out_a, grads_a, bufs_a), (out_b, grads_b, bufs_b) = (_run(f, *_stack(net), x) for f in (by_vmap, hand))
    assert out_a.shape == out_b.shape and out_a.shape[0] == K
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-4)
    assert bufs_a.keys() == bufs_b.keys()
    for name in bufs_a:   # batch norm's running statistics and batch counts, per child
        torch.testing.assert_close(bufs_b[name], bufs_a[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(x, original)   # never written to, whatever runs in place


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(_image_nets()))
def test_image_networks_stack_as_vmap_stacks_them(name, training):
    net, shape = _image_nets()[name]
    _compare(net, shape, training)
    _compare(net, shape, training, channels_last=True)


@pytest.mark.parametrize("name", list(_feature_nets()))
def test_feature_networks_stack_as_vmap_stacks_them(name):
    net, shape = _feature_nets()[name]
    _compare(net, shape, True)


@pytest.mark.parametrize("net", [
    nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2)),            # draws noise
    nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)),  # groups of its own
    nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2, momentum=None)),         # a cumulative average
    nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)),
    nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 2, 3)),                        # statistics of the shared input
    nn.Sequential(nn.Conv2d(2, 2, 3), nn.Flatten(2)),
    nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)),                                   # no parameters
    nn.GRU(4, 4),
    nn.Sequential(_Scaled(4, 2)),                                                 # a subclass's own forward
], ids=["dropout", "grouped conv", "cumulative batch norm", "batch norm 1d", "batch norm first",
        "partial flatten", "no parameters", "not sequential", "subclass"])
def test_other_networks_are_left_to_vmap(net):
    assert stacked_forward(net) is None


def _shared_layer() -> nn.Module:
    act = nn.Tanh()
    return nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act)


def _tied(name: str) -> nn.Module:
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    setattr(second, name, getattr(first, name))
    return nn.Sequential(first, nn.ReLU(), second)


def _own_forward() -> nn.Module:
    net = digits_mlp(8)
    net[0].forward = lambda x: 2 * nn.Linear.forward(net[0], x)
    return net


@pytest.mark.parametrize("make", [_shared_layer, lambda: _tied("weight"), lambda: _tied("bias"), _own_forward],
                         ids=["a layer used twice", "tied weights", "tied biases", "a forward of the layer's own"])
def test_networks_written_out_would_run_otherwise_are_left_to_vmap(make):
    """Each layer once, each tensor under its own name, each class's forward: else vmap runs the network as it is."""
    assert stacked_forward(make()) is None


def test_a_network_with_hooks_is_left_to_vmap():
    """Written out, the forward would skip them."""
    net = digits_mlp(8)
    module = torch.nn.modules.module
    hooks = [lambda: net[0].register_forward_hook(lambda m, args, out: out * 2),
             lambda: module.register_module_forward_pre_hook(lambda m, args: None),
             lambda: net[2].register_full_backward_hook(lambda m, grad_in, grad_out: grad_in),
             lambda: module.register_module_full_backward_pre_hook(lambda m, grad_out: None)]
    for register in hooks:
        assert stacked_forward(net) is not None
        handle = register()
        try:
            assert stacked_forward(net) is None
        finally:
            handle.remove()
    assert stacked_forward(net) is not None


def _hooked_mlp() -> nn.Module:
    net = digits_mlp(8)
    net[2].register_full_backward_hook(lambda module, grad_in, grad_out: tuple(
        None if g is None else g / 2 for g in grad_in))
    return net


def test_a_child_with_backward_hooks_trains_one_rate_at_a_time():
    """No stack runs a backward hook per child (vmap's gradients then differ from each child's own)."""
    from nos.tasks import from_tensors

    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    plain = from_tensors(x, y, lambda: digits_mlp(8), val_size=16, test_size=16)
    assert plain.stacks   # an MLP stacks on the CPU
    assert not from_tensors(x, y, _hooked_mlp, val_size=16, test_size=16).stacks
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda module, grad_in, grad_out: None)
    try:
        assert not plain.stacks
    finally:
        handle.remove()
    assert plain.stacks
