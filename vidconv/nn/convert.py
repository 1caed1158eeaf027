"""`convert(model)`: put vidconv's fused convolution into an existing model, keeping its weights."""

from __future__ import annotations

from collections import Counter

from torch import nn

from vidconv.nn.conv import SpatioTemporalConv


def _has_hooks(module: nn.Module) -> bool:
    # Backward hooks too: a fused ReLU would change the gradients they are given.
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _is_plain_conv3d(module: nn.Module) -> bool:
    # Exact type: a subclass may change forward (weight standardisation, ...), which we must keep.
    return type(module) is nn.Conv3d or isinstance(module, SpatioTemporalConv)


def _fused(conv: nn.Conv3d, relu: bool) -> nn.Conv3d:
    """`conv` as a SpatioTemporalConv (the same object), or unchanged if it cannot be one."""
    if isinstance(conv, SpatioTemporalConv):
        conv.relu = conv.relu or relu
        return conv
    try:
        return SpatioTemporalConv.from_conv3d(conv, relu=relu)
    except (TypeError, ValueError):
        # Arguments SpatioTemporalConv refuses (a bool kernel size, a zero stride, ...): the
        # layer keeps nn.Conv3d's forward, which works, or fails, as it did before.
        return conv


def convert(model: nn.Module, *, fuse_relu: bool = True) -> nn.Module:
    """Make every ``nn.Conv3d`` in `model` a :class:`SpatioTemporalConv`, in place.

    Each layer stays the same object; only its class changes (see
    :meth:`SpatioTemporalConv.from_conv3d`), so weights, buffers, state_dict keys, hooks, an
    existing optimizer's references and any other reference to the layer are all kept, and its
    numpy-integer shape arguments become Python ints. What the fused op cannot compute (groups,
    dilation, 'same' padding with even kernels, non-zero padding modes, ...) still runs through
    ``torch.nn.functional.conv3d`` inside the layer, so outputs and gradients are those of the
    original model. Subclasses of ``nn.Conv3d`` other than SpatioTemporalConv, and convolutions
    whose arguments SpatioTemporalConv refuses, are left as they are.

    With ``fuse_relu``, an ``nn.ReLU`` that directly follows a convolution inside an
    ``nn.Sequential`` is folded into it (``relu=True``) and its slot becomes an ``nn.Identity``;
    ReLUs applied in a custom ``forward`` are left alone, since only a Sequential makes the
    conv -> ReLU order certain. Not fused either: convolutions or ReLUs carrying hooks (the
    hooks still see what they saw before, forward and backward), and a convolution registered
    in more than one place (its other uses are not followed by that ReLU).

    Returns `model`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if type(model) is nn.Conv3d:
        return _fused(model, relu=False)
    # A snapshot: the loop swaps ReLU slots, and new Identity modules need no visit.
    parents = list(model.modules())
    uses = Counter(id(child) for parent in parents for child in parent._modules.values()
                   if child is not None)
    for parent in parents:
        names = list(parent._modules)
        for i, name in enumerate(names):
            child = parent._modules[name]
            if child is None or not _is_plain_conv3d(child):
                continue
            relu = False
            if (fuse_relu and isinstance(parent, nn.Sequential) and i + 1 < len(names)
                    and uses[id(child)] == 1 and not _has_hooks(child)):
                after = parent._modules[names[i + 1]]
                if type(after) is nn.ReLU and not _has_hooks(after):
                    converted = _fused(child, relu=True)
                    if isinstance(converted, SpatioTemporalConv):
                        parent._modules[names[i + 1]] = nn.Identity()
                    continue
            _fused(child, relu)
    return model
