"""vidconv.nn: SpatioTemporalConv as a drop-in nn.Conv3d, convert(), the preprocessing modules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vidconv import ops, reference
from vidconv.nn import CropNormalize, FoveaContext, SpatioTemporalConv, convert

# (constructor kwargs, input shape): fused-op cases first, then the F.conv3d fallbacks.
CONV_CASES = [
    (dict(in_channels=3, out_channels=5, kernel_size=(4, 11, 11), stride=(2, 3, 3)),
     (2, 3, 10, 29, 31)),
    (dict(in_channels=4, out_channels=7, kernel_size=3, padding=1, bias=False), (1, 4, 5, 9, 7)),
    (dict(in_channels=4, out_channels=6, kernel_size=(2, 5, 5), stride=(2, 1, 1),
          padding=(0, 2, 2)), (3, 4, 4, 13, 13)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding="same"), (1, 3, 5, 8, 8)),
    (dict(in_channels=3, out_channels=4, kernel_size=(1, 3, 3), padding="valid"),
     (1, 3, 2, 8, 8)),
    # Fallbacks: grouped, dilated, non-zero padding mode, 'same' with an even kernel, unbatched.
    (dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=2), (2, 4, 5, 7, 7)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, dilation=(1, 2, 2), padding=(1, 2, 2)),
     (1, 3, 5, 9, 9)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="replicate"),
     (1, 3, 4, 6, 6)),
    (dict(in_channels=3, out_channels=4, kernel_size=(2, 3, 3), padding="same"),
     (1, 3, 4, 6, 6)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), (3, 4, 6, 6)),
]
CASE_IDS = ["slow-conv1", "nobias", "slow-conv2", "same", "valid", "groups", "dilation",
            "replicate", "same-even", "unbatched"]


def _pair(kwargs, relu, dtype=torch.float32):
    torch.manual_seed(0)
    conv = nn.Conv3d(**kwargs, dtype=dtype)
    fused = SpatioTemporalConv(**kwargs, relu=relu, dtype=dtype)
    fused.load_state_dict(conv.state_dict())
    return conv, fused


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("kwargs,shape", CONV_CASES, ids=CASE_IDS)
def test_matches_conv3d_outputs_and_grads(kwargs, shape, relu):
    conv, fused = _pair(kwargs, relu)
    assert list(fused.state_dict()) == list(conv.state_dict())
    assert isinstance(fused, nn.Conv3d)
    x = torch.randn(shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    want = conv(x)
    want = F.relu(want) if relu else want
    got = fused(x2)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(fused.weight.grad, conv.weight.grad)
    if conv.bias is not None:
        torch.testing.assert_close(fused.bias.grad, conv.bias.grad)


def test_uses_fused_op_when_it_applies(monkeypatch):
    calls = []
    real = ops.st_conv3d

    def spy(*args, **kwargs):
        calls.append(args[3:])
        return real(*args, **kwargs)

    monkeypatch.setattr("vidconv.nn.conv.st_conv3d", spy)
    fused = SpatioTemporalConv(3, 4, (2, 3, 3), stride=(2, 1, 1), padding=(0, 1, 1), relu=True)
    fused(torch.randn(1, 3, 4, 6, 6))
    assert calls == [((2, 1, 1), (0, 1, 1), "relu")]
    SpatioTemporalConv(4, 4, 3, groups=2)(torch.randn(1, 4, 3, 5, 5))
    SpatioTemporalConv(3, 4, 3, padding="same")(torch.randn(1, 3, 3, 5, 5))
    assert calls[1:] == [((1, 1, 1), (1, 1, 1), None)]


def test_gradcheck_float64():
    torch.manual_seed(0)
    fused = SpatioTemporalConv(2, 2, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), relu=True,
                               dtype=torch.float64)
    x = torch.randn(1, 2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused, (x,))


def test_autocast_bfloat16_matches_conv3d():
    conv, fused = _pair(dict(in_channels=3, out_channels=8, kernel_size=3, padding=1), True)
    x = torch.randn(2, 3, 4, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.relu(conv(x))
        got = fused(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


def test_meta_and_compile_fullgraph():
    fused = SpatioTemporalConv(3, 8, (4, 11, 11), stride=(2, 3, 3), relu=True)
    with torch.device("meta"):
        meta = SpatioTemporalConv(3, 96, (4, 11, 11), stride=(2, 3, 3), relu=True)
        assert meta(torch.empty(2, 3, 10, 170, 170)).shape == (2, 96, 4, 54, 54)
    x = torch.randn(1, 3, 10, 23, 23)
    compiled = torch.compile(fused, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), fused(x))


def test_repr_names_relu():
    assert "relu=True" in repr(SpatioTemporalConv(3, 4, 3, relu=True))
    assert "relu" not in repr(SpatioTemporalConv(3, 4, 3))


# --------------------------------------------------------------------------------- convert()

class C3DLike(nn.Module):
    """A C3D-style stack (Tran et al. 2015): 3x3x3 convs + ReLU + pooling, then a classifier."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(),
            nn.MaxPool3d((1, 2, 2)),
            nn.Conv3d(8, 16, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool3d(2),
            nn.Sequential(nn.Conv3d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv3d(16, 16, 3, padding=1), nn.ReLU()),
            nn.AdaptiveAvgPool3d(1),
        )
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class WeightStandardizedConv3d(nn.Conv3d):
    """A Conv3d subclass with its own forward: convert() must leave it alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3, 4), keepdim=True)
        return F.conv3d(x, w, self.bias, self.stride, self.padding)


class R2Plus1DBlock(nn.Module):
    """An R(2+1)D residual block (Tran et al. 2018): (1,3,3) spatial then (3,1,1) temporal."""

    def __init__(self, channels: int, mid: int) -> None:
        super().__init__()
        self.spatial = nn.Conv3d(channels, mid, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.bn1 = nn.BatchNorm3d(mid)
        self.temporal = nn.Conv3d(mid, channels, (3, 1, 1), padding=(1, 0, 0), bias=False)
        self.bn2 = nn.BatchNorm3d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.spatial(x)))
        return self.relu(x + self.bn2(self.temporal(out)))


class R2Plus1DLike(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, 12, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(12), nn.ReLU(inplace=True),
            nn.Conv3d(12, 12, (3, 1, 1), padding=(1, 0, 0)), nn.ReLU(inplace=True),
        )
        self.layer1 = nn.Sequential(R2Plus1DBlock(12, 16), R2Plus1DBlock(12, 16))
        # Channel-separated (depthwise) conv as in CSN: groups > 1 takes the fallback path.
        self.depthwise = nn.Conv3d(12, 12, 3, padding=1, groups=12)
        self.standardized = WeightStandardizedConv3d(12, 12, 1)
        self.head = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.stem(x))
        x = self.standardized(F.relu(self.depthwise(x)))
        return self.head(x.mean(dim=(2, 3, 4)))


def _check_convert(model: nn.Module, x: torch.Tensor, fused_relus: int, converted: int):
    torch.manual_seed(0)
    model.eval()
    original = copy.deepcopy(model)
    params_before = {name: p for name, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    want = original(x)

    out = convert(model)
    assert out is model
    assert list(model.state_dict()) == keys_before
    # The very same Parameter objects: an optimizer built before convert() keeps working.
    assert all(p is params_before[name] for name, p in model.named_parameters())
    fused = [m for m in model.modules() if isinstance(m, SpatioTemporalConv)]
    assert len(fused) == converted
    assert sum(m.relu for m in fused) == fused_relus
    torch.testing.assert_close(model(x), want)

    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    original(x1).square().sum().backward()
    model(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    for (name, p), q in zip(model.named_parameters(), original.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_convert_c3d_like():
    torch.manual_seed(0)
    model = C3DLike()
    _check_convert(model, torch.randn(2, 3, 8, 16, 16), fused_relus=4, converted=4)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus == []  # all four were folded and their slots became nn.Identity
    assert isinstance(model.features[1], nn.Identity)


def test_convert_r2plus1d_like():
    torch.manual_seed(0)
    model = R2Plus1DLike()
    # Stem: the (3,1,1) conv is followed by a ReLU in a Sequential (fused); the first stem conv
    # is followed by BatchNorm, the blocks' convs are called from forward (not fused).
    _check_convert(model, torch.randn(2, 3, 6, 14, 14), fused_relus=1, converted=7)
    assert type(model.standardized) is WeightStandardizedConv3d
    assert isinstance(model.depthwise, SpatioTemporalConv) and model.depthwise.groups == 12


def test_convert_keeps_hooked_relu_and_conv_itself():
    seen = []
    model = nn.Sequential(nn.Conv3d(3, 4, 3), nn.ReLU())
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    convert(model)
    assert isinstance(model[0], SpatioTemporalConv) and not model[0].relu
    model(torch.randn(1, 3, 3, 5, 5))
    assert seen == [torch.Size([1, 4, 1, 3, 3])]

    conv = nn.Conv3d(3, 4, 3)
    new = convert(conv)
    assert isinstance(new, SpatioTemporalConv) and new.weight is conv.weight
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        convert("not a model")


# ------------------------------------------------------------------ preprocessing modules

def _frames(n: int = 2, t: int = 3, side: int = 178) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, t, side, side, 3), dtype=torch.uint8, generator=g)


def test_fovea_context_module_matches_op_and_reference():
    frames = _frames()
    offsets = torch.tensor([[10, 80], [44, 44]])
    flip = torch.tensor([True, False])
    module = FoveaContext(89, mean=(120.0, 115.0, 100.0), std=50.0)
    fovea, context = module(frames, offsets, flip)
    op = ops.fovea_context(frames, 89, offsets=offsets, flip=flip, mean=(120.0, 115.0, 100.0),
                           std=50.0)
    torch.testing.assert_close((fovea, context), op, rtol=0, atol=0)
    ref = reference.fovea_context(frames, 89, offsets=offsets, flip=flip,
                                  mean=(120.0, 115.0, 100.0), std=50.0)
    torch.testing.assert_close(fovea, ref[0].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(context, ref[1].float(), rtol=1e-5, atol=1e-5)
    assert fovea.shape == context.shape == (2, 3, 3, 89, 89)


def test_crop_normalize_module_matches_op_and_reference():
    frames = _frames(side=200)
    module = CropNormalize(170, dtype=torch.bfloat16, memory_format=torch.channels_last_3d)
    out = module(frames, (5, 20), True)
    op = ops.crop_normalize(frames, 170, offsets=(5, 20), flip=True, dtype=torch.bfloat16,
                            memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, op, rtol=0, atol=0)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last_3d)
    ref = reference.crop_normalize(frames, 170, offsets=(5, 20), flip=True)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    assert "size=170" in repr(module)
    with pytest.raises(ValueError, match="offsets"):
        module(frames, (40, 0))
