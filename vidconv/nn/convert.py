"""`convert(model)`: put vidconv's fused convolution into an existing model, keeping its weights."""

from __future__ import annotations

from torch import nn

from vidconv.nn.conv import SpatioTemporalConv


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _fused(conv: nn.Conv3d, relu: bool) -> SpatioTemporalConv:
    """A SpatioTemporalConv sharing `conv`'s Parameter objects (so optimizers keep working)."""
    if isinstance(conv, SpatioTemporalConv):
        conv.relu = conv.relu or relu
        return conv
    # Built on 'meta' so no memory is allocated for weights that are replaced right away.
    new = SpatioTemporalConv(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
        relu=relu,
    )
    new.weight = conv.weight
    if conv.bias is not None:
        new.bias = conv.bias
    new.train(conv.training)
    return new


def _is_plain_conv3d(module: nn.Module) -> bool:
    # Exact type: a subclass may change forward (weight standardisation, ...), which we must keep.
    return type(module) is nn.Conv3d or isinstance(module, SpatioTemporalConv)


def convert(model: nn.Module, *, fuse_relu: bool = True) -> nn.Module:
    """Replace every ``nn.Conv3d`` in `model` by a :class:`SpatioTemporalConv`, in place.

    The new layers share the old layers' Parameter objects, so weights, state_dict keys and an
    existing optimizer's references are all kept. With ``fuse_relu``, an ``nn.ReLU`` that directly
    follows a convolution inside an ``nn.Sequential`` is folded into it (``relu=True``) and its
    slot becomes an ``nn.Identity``; ReLUs applied in a custom ``forward`` are left alone, since
    only a Sequential makes the conv -> ReLU order certain. Convolutions or ReLUs carrying forward
    hooks are not fused, so the hooks still see what they saw before. Subclasses of
    ``nn.Conv3d`` other than SpatioTemporalConv are left as they are.

    Returns the model (a new module if `model` itself is an ``nn.Conv3d``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if type(model) is nn.Conv3d:
        return _fused(model, relu=False)
    # A snapshot: the loop swaps children, and new layers need no visit.
    for parent in list(model.modules()):
        names = list(parent._modules)
        for i, name in enumerate(names):
            child = parent._modules[name]
            if child is None or not _is_plain_conv3d(child):
                continue
            relu = False
            if fuse_relu and isinstance(parent, nn.Sequential) and i + 1 < len(names):
                after = parent._modules[names[i + 1]]
                if type(after) is nn.ReLU and not _has_hooks(after) and not _has_hooks(child):
                    relu = True
                    parent._modules[names[i + 1]] = nn.Identity()
            parent._modules[name] = _fused(child, relu)
    return model
