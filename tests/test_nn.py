"""vidconv.nn: SpatioTemporalConv as a drop-in nn.Conv3d, convert(), the preprocessing modules."""

from __future__ import annotations

import copy

import numpy as np
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


# Shape arguments as third-party code builds them: numpy scalars, numpy arrays, 0-d tensors,
# one-element sequences (which F.conv3d repeats).
INTEGRAL_ARGS = [
    dict(kernel_size=np.int64(3), stride=np.int64(2), padding=np.int32(1)),
    dict(kernel_size=(np.int64(1), 3, np.uint8(3)), stride=np.array([1, 2, 2]),
         padding=(0, np.int16(1), 1)),
    dict(kernel_size=torch.tensor(3), stride=torch.tensor([2, 1, 1]), padding=torch.tensor(1)),
    dict(kernel_size=3, stride=(2,), padding=[1], dilation=(np.int64(1),)),
    dict(in_channels=np.int64(4), out_channels=np.int32(6), kernel_size=3, groups=np.int64(2)),
]


@pytest.mark.parametrize("kwargs", INTEGRAL_ARGS, ids=range(len(INTEGRAL_ARGS)))
def test_integral_arguments_as_conv3d_takes_them(kwargs):
    args = dict(in_channels=4, out_channels=6) | kwargs
    torch.manual_seed(0)
    fused = SpatioTemporalConv(**args, relu=True)
    for name in ("kernel_size", "stride", "padding", "dilation"):
        assert all(type(v) is int for v in getattr(fused, name)), name
    assert type(fused.in_channels) is type(fused.groups) is int
    x = torch.randn(2, 4, 5, 9, 9)
    want = F.relu(F.conv3d(x, fused.weight, fused.bias, fused.stride, fused.padding,
                           fused.dilation, fused.groups))
    torch.testing.assert_close(fused(x), want)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(stride=2.0), TypeError, r"stride must be an int or three ints \(t, h, w\), got 2.0"),
    (dict(stride=(1, 2.5, 1)), TypeError, r"stride .* item 1 is 2.5 \(float\)"),
    (dict(padding=1.0), TypeError, "padding must be an int or three ints"),
    (dict(padding="full"), ValueError, "padding"),
    (dict(stride=True), TypeError, r"stride .*got True \(bool\)"),
    (dict(stride="2"), TypeError, "stride must be an int"),
    (dict(stride=None), TypeError, "stride must be an int"),
    (dict(dilation=torch.tensor([1.0, 2.0, 2.0])), TypeError, "dilation must be an int"),
    (dict(kernel_size=3.0), TypeError, "kernel_size must be an int"),
    (dict(kernel_size=(3,)), ValueError, "kernel_size must be an int or three ints"),
    (dict(kernel_size=(3, 3)), ValueError, "kernel_size must be an int or three ints"),
    (dict(groups=1.0), TypeError, r"groups must be an int, got 1.0 \(float\)"),
    (dict(in_channels=3.0), TypeError, "in_channels must be an int"),
    (dict(out_channels=True), TypeError, "out_channels must be an int"),
    (dict(stride=0), ValueError, r"stride must be >= 1 along each axis, got \[0, 0, 0\]"),
    (dict(padding=(0, -1, 0)), ValueError, "padding must be >= 0"),
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1"),
    (dict(stride=2**63), ValueError, "stride must be at most"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        SpatioTemporalConv(**(dict(in_channels=3, out_channels=4, kernel_size=3) | kwargs))


def test_what_the_fused_op_cannot_take_runs_as_conv3d(monkeypatch):
    """Strides beyond 32 bits, mismatched dtypes and kernels larger than the input go through
    F.conv3d: the same result, or the same error, as nn.Conv3d."""
    calls = []
    monkeypatch.setattr("vidconv.nn.conv.st_conv3d",
                        lambda *a, **k: calls.append(a) or ops.st_conv3d(*a, **k))
    conv, fused = _pair(dict(in_channels=3, out_channels=4, kernel_size=3, stride=2**40,
                             padding=1), relu=False)
    x = torch.randn(1, 3, 4, 6, 6)
    torch.testing.assert_close(fused(x), conv(x))
    conv, fused = _pair(dict(in_channels=3, out_channels=4, kernel_size=3), relu=False)
    for bad in (x.double(), torch.randn(1, 3, 2, 6, 6), torch.randn(1, 2, 4, 6, 6)):
        with pytest.raises(RuntimeError) as want:
            conv(bad)
        with pytest.raises(RuntimeError) as got:
            fused(bad)
        assert str(got.value) == str(want.value)
    assert calls == []


def test_contiguous_input_gives_contiguous_output(monkeypatch):
    """The CUDA kernel writes channels_last_3d; code after an nn.Conv3d fed contiguous input may
    .view() its output, so the layer hands back contiguous memory then (simulated on the CPU by
    an op that returns channels_last_3d, as the CUDA kernel does)."""
    cl = torch.channels_last_3d

    def channels_last_op(*args, **kwargs):
        return ops.st_conv3d(*args, **kwargs).contiguous(memory_format=cl)

    monkeypatch.setattr("vidconv.nn.conv.st_conv3d", channels_last_op)
    conv, fused = _pair(dict(in_channels=3, out_channels=8, kernel_size=3, padding=1), True)
    x = torch.randn(2, 3, 4, 5, 5)
    y = fused(x)
    assert y.is_contiguous()
    torch.testing.assert_close(y.view(2, -1), F.relu(conv(x)).view(2, -1))
    # A channels_last_3d input keeps channels_last_3d output (no copy), as cuDNN does.
    assert fused(x.contiguous(memory_format=cl)).is_contiguous(memory_format=cl)


@pytest.mark.cuda
def test_cuda_output_memory_format_follows_conv3d():
    conv, fused = _pair(dict(in_channels=8, out_channels=16, kernel_size=3, padding=1), True)
    conv, fused = conv.cuda(), fused.cuda()
    x = torch.randn(2, 8, 4, 9, 9, device="cuda")
    y = fused(x)
    assert y.is_contiguous()
    torch.testing.assert_close(y.view(2, -1), F.relu(conv(x)).view(2, -1), rtol=1e-4,
                               atol=1e-4)
    cl = torch.channels_last_3d
    assert fused(x.contiguous(memory_format=cl)).is_contiguous(memory_format=cl)


def test_autocast_leaves_float64_alone():
    """Autocast does not cast float64 tensors for nn.Conv3d; neither may the fused path."""
    conv, fused = _pair(dict(in_channels=3, out_channels=4, kernel_size=3), False,
                        dtype=torch.float64)
    x = torch.randn(1, 3, 4, 6, 6, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = conv(x), fused(x)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want)


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


# Third-party-style models, written here the way video model zoos write them.

class FactoredConv(nn.Module):
    """R(2+1)D's (2+1)D convolution (Tran et al. 2018): a (1, d, d) spatial conv to M channels,
    BatchNorm, ReLU, then a (t, 1, 1) temporal conv, with M chosen so the parameter count
    matches a full t x d x d conv. Hyperparameters are numpy values, as configs often give."""

    def __init__(self, cin: int, cout: int, kernel, stride, padding) -> None:
        super().__init__()
        k, s, p = np.asarray(kernel), np.asarray(stride), np.asarray(padding)
        mid = np.floor(k.prod() * cin * cout / (k[1] * k[2] * cin + k[0] * cout)).astype(np.int64)
        self.spatial = nn.Conv3d(cin, mid, (1, k[1], k[2]), (1, s[1], s[2]), (0, p[1], p[2]),
                                 bias=False)
        self.bn = nn.BatchNorm3d(int(mid))
        self.relu = nn.ReLU(inplace=True)
        self.temporal = nn.Conv3d(mid, cout, (k[0], 1, 1), (s[0], 1, 1), (p[0], 0, 0),
                                  bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal(self.relu(self.bn(self.spatial(x))))


class FactoredResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, downsample: bool) -> None:
        super().__init__()
        stride = np.array([2, 2, 2]) if downsample else np.ones(3, dtype=np.int64)
        self.conv1 = FactoredConv(cin, cout, np.full(3, 3), stride, np.ones(3, dtype=np.int32))
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = FactoredConv(cout, cout, np.full(3, 3), np.ones(3, dtype=np.int64),
                                  np.ones(3, dtype=np.int64))
        self.bn2 = nn.BatchNorm3d(cout)
        self.shortcut = (nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False),
                                       nn.BatchNorm3d(cout)) if downsample else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.shortcut(x) + self.bn2(self.conv2(y)))


class NumpyR2Plus1D(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = FactoredConv(3, 8, (3, 7, 7), np.array([1, 2, 2]), np.array([1, 3, 3]))
        self.blocks = nn.Sequential(FactoredResBlock(8, 8, False), FactoredResBlock(8, 12, True))
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3, 4)))


class X3DBottleneck(nn.Module):
    """X3D's block (Feichtenhofer 2020): 1x1x1 expansion, a depthwise 3x3x3 conv (spatially
    strided), SiLU, 1x1x1 projection; `groups` > 1 makes the middle conv grouped, not
    depthwise."""

    def __init__(self, cin: int, expanded: int, cout: int, stride: int, groups: int | None):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv3d(cin, expanded, 1, bias=False),
                                    nn.BatchNorm3d(expanded), nn.ReLU())
        self.middle = nn.Conv3d(expanded, expanded, 3, stride=(1, stride, stride), padding=1,
                                groups=groups or expanded, bias=False)
        self.bn = nn.BatchNorm3d(expanded)
        self.act = nn.SiLU()
        self.project = nn.Sequential(nn.Conv3d(expanded, cout, 1, bias=False),
                                     nn.BatchNorm3d(cout))
        self.skip = (nn.Conv3d(cin, cout, 1, stride=(1, stride, stride))
                     if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.act(self.bn(self.middle(self.expand(x)))))
        return F.relu(y + (x if self.skip is None else self.skip(x)))


class X3DLike(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
            nn.Conv3d(8, 8, (5, 1, 1), padding=(2, 0, 0), groups=8, bias=False),
            nn.BatchNorm3d(8), nn.ReLU())
        self.blocks = nn.Sequential(X3DBottleneck(8, 16, 8, 1, None),
                                    X3DBottleneck(8, 24, 12, 2, groups=4))
        self.head = nn.Sequential(nn.Conv3d(12, 20, 1), nn.ReLU(), nn.AdaptiveAvgPool3d(1))
        self.fc = nn.Linear(20, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))).flatten(1))


class SlowFastLike(nn.Module):
    """SlowFast's two pathways (Feichtenhofer et al. 2019): the fast one sees every frame with
    few channels, the slow one every alpha-th frame; a lateral (5, 1, 1) conv with temporal
    stride alpha carries fast features into the slow path, concatenated on channels."""

    def __init__(self, classes: int = 4, alpha: int = 4) -> None:
        super().__init__()
        alpha = np.int64(alpha)  # as computed from a config's numpy arrays
        self.alpha = alpha
        self.slow_stem = nn.Sequential(
            nn.Conv3d(3, 8, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3)), nn.ReLU())
        self.fast_stem = nn.Sequential(
            nn.Conv3d(3, 2, (5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3)), nn.ReLU())
        self.lateral = nn.Conv3d(2, 4, (5, 1, 1), stride=(alpha, 1, 1), padding=(2, 0, 0),
                                 bias=False)
        self.slow_res = nn.Sequential(nn.Conv3d(12, 12, (1, 3, 3), padding=(0, 1, 1)),
                                      nn.ReLU(inplace=True))
        self.fast_res = nn.Sequential(nn.Conv3d(2, 2, (3, 3, 3), padding=1), nn.ReLU())
        self.fc = nn.Linear(14, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.fast_stem(x)
        slow = self.slow_stem(x[:, :, ::self.alpha])
        slow = self.slow_res(torch.cat([slow, self.lateral(fast)], dim=1))
        fast = self.fast_res(fast)
        return self.fc(torch.cat([slow.mean(dim=(2, 3, 4)), fast.mean(dim=(2, 3, 4))], dim=1))


class PaddingZoo(nn.Module):
    """Convolutions the fused op cannot express ('same' with even kernels, dilation, reflect
    padding) between ones it can, each followed by a ReLU in a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(3, 6, (2, 4, 4), padding="same"), nn.ReLU(),
            nn.Conv3d(6, 6, 3, padding="same"), nn.ReLU(),
            nn.Conv3d(6, 6, 3, dilation=(1, 2, 2), padding="same"), nn.ReLU(),
            nn.Conv3d(6, 6, 3, dilation=2, padding=2), nn.ReLU(),
            nn.Conv3d(6, 6, (3, 2, 2), padding="same", dilation=(2, 1, 1)), nn.ReLU(),
            nn.Conv3d(6, 6, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
            nn.Conv3d(6, 6, 3, padding="valid"), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _fused_calls(monkeypatch) -> list[tuple]:
    calls: list[tuple] = []
    real = ops.st_conv3d

    def spy(*args, **kwargs):
        calls.append(tuple(args[1].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr("vidconv.nn.conv.st_conv3d", spy)
    return calls


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("make,shape,fused_relus,converted,fused_per_forward", [
    # Every conv is converted; all 11 take the fused op; none is followed by a ReLU in a
    # Sequential (the factored convs' ReLU is applied in forward).
    (NumpyR2Plus1D, (2, 3, 4, 16, 16), 0, 11, 11),
    # Only the head's ReLU follows its conv directly (BatchNorm sits between the others);
    # the depthwise and grouped convs run as F.conv3d.
    (X3DLike, (2, 3, 4, 12, 12), 1, 10, 7),
    (SlowFastLike, (2, 3, 8, 14, 14), 4, 5, 5),
    # Only 'same' with an odd kernel and 'valid' are the fused op's.
    (PaddingZoo, (1, 3, 6, 9, 9), 7, 7, 2),
], ids=["r2plus1d-numpy", "x3d", "slowfast", "padding"])
def test_convert_third_party_models(monkeypatch, make, shape, fused_relus, converted,
                                    fused_per_forward):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(shape)
    calls = _fused_calls(monkeypatch)
    _check_convert(model, x, fused_relus=fused_relus, converted=converted)
    calls.clear()
    model(x)
    assert len(calls) == fused_per_forward


def test_convert_strided_lateral_runs_fused_with_python_ints(monkeypatch):
    model = SlowFastLike(alpha=4)
    convert(model)
    assert model.lateral.stride == (4, 1, 1) and type(model.lateral.stride[0]) is int
    calls = _fused_calls(monkeypatch)
    model.lateral(torch.randn(1, 2, 8, 5, 5))
    assert calls == [(4, 2, 5, 1, 1)]


def test_convert_keeps_conv_hooks_pruning_and_shared_layers():
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    seen = []
    pruned = nn.Conv3d(3, 4, 3, padding=1)
    prune.l1_unstructured(pruned, "weight", amount=0.5)  # a pre-hook recomputes .weight
    hooked = nn.Conv3d(4, 4, 3, padding=1)
    hooked.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    shared = nn.Conv3d(4, 4, 1)
    model = nn.Sequential(pruned, nn.ReLU(), hooked, nn.ReLU(),
                          nn.Sequential(shared, nn.ReLU()), shared)
    model.tag = "kept"
    hooked.note = "kept too"
    x = torch.randn(2, 3, 4, 6, 6)
    keys = list(model.state_dict())  # (a pruned layer's .weight is no leaf: no deepcopy)
    want = model(x)
    want_hooked = seen.pop()

    assert convert(model) is model
    assert model[0] is pruned and isinstance(pruned, SpatioTemporalConv)
    # Hooked convs (pruning's pre-hook included) and the conv used twice keep their ReLUs.
    assert not pruned.relu and isinstance(model[1], nn.ReLU)
    assert isinstance(hooked, SpatioTemporalConv) and not hooked.relu
    assert isinstance(model[3], nn.ReLU)
    assert model[4][0] is model[5] is shared and not shared.relu
    assert isinstance(model[4][1], nn.ReLU)
    assert list(model.state_dict()) == keys
    assert hooked.note == "kept too"
    torch.testing.assert_close(model(x), want)
    torch.testing.assert_close(seen[-1], want_hooked)


def test_convert_leaves_what_it_cannot_take():
    """An nn.Conv3d built from arguments SpatioTemporalConv refuses keeps nn.Conv3d's forward,
    so convert() never breaks a model that worked."""
    odd = nn.Conv3d(True, 2, True)  # nn.Conv3d takes bools here; SpatioTemporalConv does not
    model = nn.Sequential(odd, nn.ReLU())
    x = torch.randn(1, 1, 2, 3, 3)
    want = model(x)
    convert(model)
    assert type(model[0]) is nn.Conv3d and isinstance(model[1], nn.ReLU)
    torch.testing.assert_close(model(x), want)


def _random_conv3d(rng: np.random.Generator) -> tuple[nn.Conv3d, torch.Tensor]:
    """An nn.Conv3d drawn over what third-party code builds (groups, dilation, 'same', padding
    modes, numpy arguments, float64), and an input for it (sometimes channels_last_3d)."""
    groups = int(rng.choice([1, 1, 2, 3]))
    cin, cout = groups * int(rng.integers(1, 4)), groups * int(rng.integers(1, 3))
    kernel = tuple(int(v) for v in rng.integers(1, 4, size=3))
    dilation = tuple(int(v) for v in rng.choice([1, 1, 2], size=3))
    mode = str(rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"]))
    if rng.random() < 0.25:
        stride, padding = (1, 1, 1), "same"
    else:
        stride = tuple(int(v) for v in rng.integers(1, 4, size=3))
        padding = tuple(int(v) for v in rng.integers(0, 2 if mode != "zeros" else 3, size=3))
    if rng.random() < 0.5:  # as numpy-configured model code passes them
        cin, kernel = np.int64(cin), tuple(np.int64(k) for k in kernel)
        stride = np.array(stride)
    dtype = torch.float64 if rng.random() < 0.3 else torch.float32
    conv = nn.Conv3d(cin, cout, kernel, stride, padding, dilation, groups,
                     bias=bool(rng.random() < 0.7), padding_mode=mode, dtype=dtype)
    x = torch.randn(2, int(cin), 7, 8, 9, dtype=dtype)
    if rng.random() < 0.3:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return conv, x


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_convert_random_conv3d_configurations_keep_meaning():
    """Output, gradients, or the very same error as before convert(), over 50 random layers."""
    rng = np.random.default_rng(0)
    for trial in range(50):
        torch.manual_seed(trial)
        conv, x = _random_conv3d(rng)
        model = nn.Sequential(conv, nn.ReLU()) if trial % 2 else nn.Sequential(conv)
        original = copy.deepcopy(model)
        try:
            want = original(x)
        except RuntimeError as exc:
            with pytest.raises(RuntimeError) as got:
                convert(model)(x)
            assert str(got.value) == str(exc), (trial, conv)
            continue
        convert(model)
        assert isinstance(model[0], SpatioTemporalConv)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out = model(x2)
        torch.testing.assert_close(out, want, msg=f"trial {trial}: {conv}")
        original(x1).square().sum().backward()
        out.square().sum().backward()
        torch.testing.assert_close(x2.grad, x1.grad)
        for p, q in zip(model.parameters(), original.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad)


def test_autocast_mixed_dtypes_fail_as_conv3d_does():
    conv, fused = _pair(dict(in_channels=3, out_channels=4, kernel_size=3), False,
                        dtype=torch.float64)
    x = torch.randn(1, 3, 4, 6, 6)  # float32 input, float64 weights: autocast casts only x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError) as want:
            conv(x)
        with pytest.raises(RuntimeError) as got:
            fused(x)
    assert str(got.value) == str(want.value)


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


@pytest.mark.parametrize("module", [FoveaContext, CropNormalize], ids=lambda m: m.__name__)
def test_preprocess_modules_check_arguments_when_built(module):
    with pytest.raises(TypeError, match=r"size must be an int, got True \(bool\)"):
        module(True)
    with pytest.raises(TypeError, match="mean must be one float or 3 floats, got None"):
        module(89, mean=None)
    with pytest.raises(ValueError, match="std must be finite"):
        module(89, std=float("nan"))
    with pytest.raises(ValueError, match="std must be non-zero"):
        module(89, std=(1.0, 0.0, 1.0))
    built = module(np.int64(89), mean=np.array([1.0, 2.0, 3.0]), std=np.float32(2.0))
    assert built.size == 89 and type(built.size) is int
    assert built.mean == (1.0, 2.0, 3.0) and built.std == (2.0, 2.0, 2.0)
