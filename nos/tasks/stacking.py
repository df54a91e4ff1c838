"""K stacked copies of a network, run forward as one network written out by hand.

`StackedChildren` (nos.tasks.stacked) holds K children of one architecture
as one set of tensors, each with a new leading dimension of K.
`torch.func.vmap` runs any network that way, but pays host time in every op
(its batching rules, and the moves of the stacked dimension between them)
that outweighs a small child's kernels. For an `nn.Sequential` of common
layers `stacked_forward` writes the same computation out directly:

- the input batch is the same for every child: the first Linear or Conv2d
  reads it once, with all K children's weights;
- images of the stack are one tensor [batch, K x channels, H, W]: a
  convolution is a grouped one (K groups), batch norm is one call over
  K x channels (it works per channel), pooling and activations apply as
  they are; the children's channels stay in the input's memory format, so
  channels-last works as it does for one child;
- features are [K, batch, ...], and a Linear layer is a batched matmul.

The output is [K, batch, ...], as vmap's. Any other network, layer or
setting (dropout, a convolution with groups of its own, batch norm with a
cumulative average, a layer used twice or a parameter two layers share, a
hook, ...) gets None: vmap runs those.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module

# What the running tensor holds: the input itself, shared by every child; the children's images side by
# side along the channels, [batch, K x channels, ...]; or their features, [K, batch, ...].
SHARED, IMAGES, FEATURES = "shared", "images", "features"

# Layers that act on each value alone, so they apply to a stack as they are.
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity)
# Layers that act on each channel of an image alone.
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)

StackedForward = Callable[[dict[str, Tensor], dict[str, Tensor], Tensor], Tensor]


def stacked_forward(skeleton: nn.Module) -> StackedForward | None:
    """forward(params, buffers, x) for K stacked copies of `skeleton`, or None where vmap must do it."""
    if (type(skeleton) is not nn.Sequential or next(skeleton.parameters(), None) is None or _hooked(skeleton)
            or _shares(skeleton)):
        return None
    layers = list(skeleton.named_children())
    kind = SHARED
    for _, layer in layers:
        kind = _after(layer, kind)
        if kind is None:
            return None

    def forward(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        k = len(next(iter(params.values())))
        h, kind = x, SHARED
        for name, layer in layers:
            h, kind = _apply(name, layer, params, buffers, h, kind, k)
        if kind == IMAGES:   # a network that ends on images: each child's, [K, batch, channels, ...]
            return h.reshape(h.shape[0], k, -1, *h.shape[2:]).transpose(0, 1)
        return h

    return forward


def _hooked(skeleton: nn.Module) -> bool:
    """Whether a hook or a forward of a module's own could run in the network: written out, it would be skipped."""
    if (module._global_forward_hooks or module._global_forward_pre_hooks or module._global_backward_hooks
            or module._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               or "forward" in vars(m) for m in skeleton.modules())


def _shares(skeleton: nn.Module) -> bool:
    """Whether a layer, parameter or buffer appears twice in the network.

    Written out, the layers run once each, in `named_children`'s order, and each finds its
    tensors under its own name; a stack's state names a shared tensor once, as its first holder's.
    """
    listings = (skeleton.named_modules, skeleton.named_parameters, skeleton.named_buffers)
    return any(len(list(listing(remove_duplicate=False))) != len(list(listing())) for listing in listings)


def _after(layer: nn.Module, kind: str) -> str | None:
    """What the running tensor holds after `layer` reads one holding `kind`; None where unsupported.

    Layers are matched by their exact class: a subclass may compute something else.
    """
    cls = type(layer)
    if cls in ELEMENTWISE:
        return kind
    if cls is nn.Linear:
        return FEATURES if kind in (SHARED, FEATURES) else None
    if cls is nn.Conv2d:
        plain = layer.groups == 1 and layer.padding_mode == "zeros"
        return IMAGES if plain and kind in (SHARED, IMAGES) else None
    if cls is nn.BatchNorm2d:
        # A cumulative average (momentum None) would need each child's own batch count in one call.
        return IMAGES if kind == IMAGES and layer.momentum is not None else None
    if cls in POOLS:
        return kind if kind in (SHARED, IMAGES) and not getattr(layer, "return_indices", False) else None
    if cls is nn.Flatten:
        if (layer.start_dim, layer.end_dim) != (1, -1):
            return None
        return FEATURES if kind == IMAGES else kind
    return None


def _apply(name: str, layer: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], h: Tensor,
           kind: str, k: int) -> tuple[Tensor, str]:
    if isinstance(layer, nn.Linear):
        return _linear(params[f"{name}.weight"], params.get(f"{name}.bias"), h, kind), FEATURES
    if isinstance(layer, nn.Conv2d):
        weight, bias = params[f"{name}.weight"], params.get(f"{name}.bias")
        h = F.conv2d(h, weight.reshape(-1, *weight.shape[2:]), None if bias is None else bias.reshape(-1),
                     layer.stride, layer.padding, layer.dilation, 1 if kind == SHARED else k)
        return h, IMAGES
    if isinstance(layer, nn.BatchNorm2d):
        return _batch_norm(name, layer, params, buffers, h), IMAGES
    if isinstance(layer, nn.Flatten):
        if kind == IMAGES:
            return h.reshape(h.shape[0], k, -1).transpose(0, 1), FEATURES
        return h.flatten(1 if kind == SHARED else 2), kind
    if kind == SHARED and getattr(layer, "inplace", False):
        return layer(h.clone()), kind   # never in place on the task's own data
    return layer(h), kind


def _linear(weight: Tensor, bias: Tensor | None, h: Tensor, kind: str) -> Tensor:
    """[K, out, in] weights on the shared input [batch, ..., in] or on features [K, batch, ..., in]."""
    weight = weight.transpose(1, 2)
    if kind == SHARED:
        h = h.expand(weight.shape[0], *h.shape)
    if h.dim() == 3:
        return torch.bmm(h, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), h, weight)
    shape = (weight.shape[0],) + (1,) * (h.dim() - 3)
    out = torch.matmul(h, weight.reshape(*shape, *weight.shape[1:]))
    return out if bias is None else out + bias.reshape(*shape, 1, -1)


def _batch_norm(name: str, layer: nn.BatchNorm2d, params: dict[str, Tensor], buffers: dict[str, Tensor],
                h: Tensor) -> Tensor:
    """As `nn.BatchNorm2d.forward` does, over the stack's K x channels at once."""
    mean, var = buffers.get(f"{name}.running_mean"), buffers.get(f"{name}.running_var")
    if layer.training and not layer.track_running_stats:   # statistics kept but not tracked: left as they are
        mean = var = None
    if layer.training and layer.track_running_stats and f"{name}.num_batches_tracked" in buffers:
        buffers[f"{name}.num_batches_tracked"].add_(1)
    training = layer.training or (mean is None and var is None)
    weight, bias = params.get(f"{name}.weight"), params.get(f"{name}.bias")
    # The stacked statistics are contiguous [K, channels]: their flat views are updated in place.
    return F.batch_norm(h, None if mean is None else mean.view(-1), None if var is None else var.view(-1),
                        None if weight is None else weight.reshape(-1), None if bias is None else bias.reshape(-1),
                        training, layer.momentum, layer.eps)


__all__ = ["ELEMENTWISE", "POOLS", "stacked_forward"]
