"""vidconv.models: the paper's layer sizes, parameter counts, MACs, input handling, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vidconv
from vidconv.models import build, list_models, split_fovea_context
from vidconv.nn import SpatioTemporalConv

ARCHS = ["single_frame", "early_fusion", "late_fusion", "slow_fusion"]
# (multires, stream): full resolution, fovea + context, and the two single-stream networks.
VARIANTS = [(False, "both"), (True, "both"), (True, "fovea"), (True, "context")]
VARIANT_IDS = ["full", "multires", "fovea", "context"]

# The paper's layer list (shared/paper.md): filters and spatial kernel of conv1..conv5.
CHANNELS = (96, 256, 384, 384, 256)
SPATIAL_KERNELS = (11, 5, 3, 3, 3)
# Temporal extent of conv1..conv5 and the frames each stage leaves, per architecture.
TEMPORAL_KERNELS = {
    "single_frame": (1, 1, 1, 1, 1),
    "early_fusion": (10, 1, 1, 1, 1),
    "late_fusion": (1, 1, 1, 1, 1),
    "slow_fusion": (4, 2, 2, 1, 1),
}
FRAMES_IN = {"single_frame": 1, "early_fusion": 10, "late_fusion": 2, "slow_fusion": 10}
FRAMES_OUT = {
    "single_frame": (1, 1, 1, 1, 1),
    "early_fusion": (1, 1, 1, 1, 1),
    "late_fusion": (2, 2, 2, 2, 2),
    "slow_fusion": (4, 2, 1, 1, 1),
}
# Spatial side after each conv and after each pooling, from shared/paper.md:
# full resolution 170 -> 54 -> 27 -> 27 -> 14 -> 14 -> 7; multires 89 -> 27 -> 14 -> 14 -> 7 -> 7.
FULL_CONV_SIDES = (54, 27, 14, 14, 14)
FULL_POOL_SIDES = {"conv1": 27, "conv2": 14, "conv5": 7}
MULTIRES_CONV_SIDES = (27, 14, 7, 7, 7)
MULTIRES_POOL_SIDES = {"conv1": 14, "conv2": 7}


def n_towers(multires: bool, stream: str) -> int:
    return 2 if multires and stream == "both" else 1


def expected_params(arch: str, multires: bool, stream: str, classes: int = 487) -> int:
    """Parameter count written out from the paper's layer list (not from the model code)."""
    conv, c_in = 0, 3
    for c_out, k, kt in zip(CHANNELS, SPATIAL_KERNELS, TEMPORAL_KERNELS[arch], strict=True):
        conv += c_out * (c_in * kt * k * k + 1)
        c_in = c_out
    fc1_in = n_towers(multires, stream) * 256 * FRAMES_OUT[arch][-1] * 7 * 7
    return (n_towers(multires, stream) * conv + (fc1_in + 1) * 4096 + (4096 + 1) * 4096
            + (4096 + 1) * classes)


def meta_model(arch: str, multires: bool, stream: str, **kwargs) -> vidconv.models.VideoNet:
    with torch.device("meta"):
        return build(arch, multires=multires, stream=stream, **kwargs).eval()


def clip_for(model, batch: int = 2, device: str | torch.device = "cpu") -> torch.Tensor:
    side = 2 * model.spec.size if model.multires else model.spec.size
    return torch.randn(batch, 3, model.spec.frames, side, side, device=device)


def test_registry_names_in_paper_order():
    assert list_models() == ARCHS


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model name 'fast_fusion'") as err:
        build("fast_fusion")
    for name in ARCHS:
        assert name in str(err.value)


def test_single_frame_parameter_count_matches_paper():
    model = meta_model("single_frame", False, "both")
    assert sum(p.numel() for p in model.parameters()) == 73_908_071
    tower = model.towers["frames"]
    assert sum(p.numel() for p in tower.parameters()) == 3_747_200
    assert (model.fc1.in_features, model.fc1.out_features) == (12544, 4096)
    assert (model.fc2.in_features, model.fc2.out_features) == (4096, 4096)
    assert (model.classifier.in_features, model.classifier.out_features) == (4096, 487)
    assert model.complexity()["params"] == 73_908_071


@pytest.mark.parametrize("multires,stream", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_formula(arch, multires, stream):
    model = meta_model(arch, multires, stream)
    expected = expected_params(arch, multires, stream)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.complexity()["params"] == expected


@pytest.mark.parametrize("multires,stream", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_stage_shape_matches_paper(arch, multires, stream):
    """Full-width forward on 'meta' tensors: shapes only, no compute."""
    model = meta_model(arch, multires, stream)
    seen: dict[str, tuple[int, ...]] = {}
    hooks = []
    for tower_name, tower in model.towers.items():
        for stage_name, stage in tower.named_children():
            for part, module in stage.named_children():
                key = f"{tower_name}.{stage_name}.{part}"
                hooks.append(module.register_forward_hook(
                    lambda _m, _i, out, key=key: seen.__setitem__(key, tuple(out.shape))))
    logits = model(clip_for(model, batch=2, device="meta"))
    for h in hooks:
        h.remove()
    assert tuple(logits.shape) == (2, 487)

    conv_sides = MULTIRES_CONV_SIDES if multires else FULL_CONV_SIDES
    pool_sides = MULTIRES_POOL_SIDES if multires else FULL_POOL_SIDES
    expected_towers = ["frames"] if not multires else (
        ["fovea", "context"] if stream == "both" else [stream])
    assert list(model.towers) == expected_towers
    for tower_name in expected_towers:
        for i, (c, side, t) in enumerate(
                zip(CHANNELS, conv_sides, FRAMES_OUT[arch], strict=True)):
            stage = f"conv{i + 1}"
            assert seen[f"{tower_name}.{stage}.conv"] == (2, c, t, side, side), stage
            if stage in ("conv1", "conv2"):
                assert seen[f"{tower_name}.{stage}.norm"] == (2, c, t, side, side)
            if stage in pool_sides:
                p = pool_sides[stage]
                assert seen[f"{tower_name}.{stage}.pool"] == (2, c, t, p, p), stage
            else:
                assert f"{tower_name}.{stage}.pool" not in seen, stage
        # Every stream ends at 7x7x256 per frame left in time.
        assert seen[f"{tower_name}.conv5.{'conv' if multires else 'pool'}"][1:] == (
            256, FRAMES_OUT[arch][-1], 7, 7)
    fc1_in = len(expected_towers) * 256 * 7 * 7 * FRAMES_OUT[arch][-1]
    assert model.fc1.in_features == fc1_in
    assert model.feature_size() == (FRAMES_OUT[arch][-1], 7, 7)


@pytest.mark.parametrize("multires,stream", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_macs_match_counted_forward(arch, multires, stream):
    """complexity()['macs'] (layer-table arithmetic) equals MACs counted on a meta forward."""
    model = meta_model(arch, multires, stream)
    counted = [0]

    def count(module, inputs, out):
        if isinstance(module, nn.Conv3d):
            per_output = module.weight[0].numel()  # C_in * kt * kh * kw
            counted[0] += out[0].numel() * per_output
        else:
            counted[0] += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, nn.Conv3d | nn.Linear)]
    model(clip_for(model, batch=1, device="meta"))
    for h in hooks:
        h.remove()
    assert model.complexity()["macs"] == counted[0]


def test_macs_single_frame_by_hand():
    conv = (54 * 54 * 96 * 3 * 121 + 27 * 27 * 256 * 96 * 25 + 14 * 14 * 384 * 256 * 9
            + 14 * 14 * 384 * 384 * 9 + 14 * 14 * 256 * 384 * 9)
    fc = 12544 * 4096 + 4096 * 4096 + 4096 * 487
    assert meta_model("single_frame", False, "both").complexity()["macs"] == conv + fc
    # Multires: two 89x89 streams of a quarter of the conv work each, fc1 twice as wide.
    conv_mr = (27 * 27 * 96 * 3 * 121 + 14 * 14 * 256 * 96 * 25 + 7 * 7 * 384 * 256 * 9
               + 7 * 7 * 384 * 384 * 9 + 7 * 7 * 256 * 384 * 9)
    fc_mr = 2 * 12544 * 4096 + 4096 * 4096 + 4096 * 487
    assert (meta_model("single_frame", True, "both").complexity()["macs"]
            == 2 * conv_mr + fc_mr)


@pytest.mark.parametrize("arch", ARCHS)
def test_spec(arch):
    offsets = {"single_frame": (0,), "late_fusion": (0, 15)}.get(arch, tuple(range(10)))
    full = meta_model(arch, False, "both")
    assert (full.spec.frame_offsets, full.spec.size, full.spec.frame_size) == (offsets, 170, 200)
    assert full.spec.frames == FRAMES_IN[arch] and not full.spec.multires
    for stream in ("both", "fovea", "context"):
        mr = meta_model(arch, True, stream)
        assert (mr.spec.frame_offsets, mr.spec.size, mr.spec.frame_size) == (offsets, 89, 178)
        assert mr.spec.multires and mr.spec.stream == stream
    assert full.spec.span == (16 if arch == "late_fusion" else len(offsets))


def test_convs_are_fused_3d_convs_with_paper_kernels():
    model = meta_model("slow_fusion", False, "both")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert len(convs) == 5 and all(isinstance(c, SpatioTemporalConv) and c.relu for c in convs)
    assert [tuple(c.weight.shape) for c in convs] == [
        (96, 3, 4, 11, 11), (256, 96, 2, 5, 5), (384, 256, 2, 3, 3), (384, 384, 1, 3, 3),
        (256, 384, 1, 3, 3)]
    assert [c.stride for c in convs] == [(2, 3, 3), (2, 1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1)]
    lrn = [m for m in model.modules() if isinstance(m, nn.LocalResponseNorm)]
    assert [(m.size, m.alpha, m.beta, m.k) for m in lrn] == [(5, 1e-4, 0.5, 2.0)] * 2


def test_width_scales_channels_and_fc():
    model = meta_model("single_frame", False, "both", width=0.25, num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert [c.out_channels for c in convs] == [24, 64, 96, 96, 64]
    assert (model.fc1.in_features, model.fc1.out_features) == (64 * 49, 1024)
    assert (model.fc2.out_features, model.classifier.out_features) == (1024, 10)


@pytest.mark.parametrize("multires,stream", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_trains_on_random_data(arch, multires, stream):
    torch.manual_seed(0)
    model = build(arch, num_classes=4, multires=multires, stream=stream, width=1 / 16,
                  dropout=0.0)
    x, y = clip_for(model, batch=4), torch.arange(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
    # Every parameter received a gradient: no stage is cut off from the loss.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_late_fusion_shares_tower_and_concatenates_frames():
    torch.manual_seed(0)
    model = build("late_fusion", width=1 / 16, num_classes=3).eval()
    x = clip_for(model, batch=2)
    feats = model.tower_features(x)
    tower = model.towers["frames"]
    first = tower(x[:, :, :1]).flatten(1)
    second = tower(x[:, :, 1:]).flatten(1)
    torch.testing.assert_close(feats, torch.cat([first, second], dim=1))


def test_split_fovea_context_is_centre_crop_and_2x2_mean():
    clip = torch.randn(2, 3, 2, 178, 178)
    fovea, context = split_fovea_context(clip)
    torch.testing.assert_close(fovea, clip[..., 44:133, 44:133])
    manual = clip.reshape(2, 3, 2, 89, 2, 89, 2).mean(dim=(4, 6))
    torch.testing.assert_close(context, manual)
    with pytest.raises(ValueError, match=r"\(N, C, T, 178, 178\)"):
        split_fovea_context(clip[..., :170, :170])


@pytest.mark.parametrize("arch", ["single_frame", "slow_fusion"])
def test_multires_accepts_clip_pair_or_single_stream(arch):
    torch.manual_seed(0)
    both = build(arch, num_classes=3, multires=True, width=1 / 16).eval()
    clip = clip_for(both)
    fovea, context = split_fovea_context(clip)
    torch.testing.assert_close(both(clip), both((fovea, context)))
    torch.testing.assert_close(both(clip), both([fovea, context]))
    for stream, alone in (("fovea", fovea), ("context", context)):
        one = build(arch, num_classes=3, multires=True, stream=stream, width=1 / 16).eval()
        out = one(alone)
        torch.testing.assert_close(one(clip), out)
        torch.testing.assert_close(one((fovea, context)), out)


def test_multires_takes_fused_preprocessing_output():
    """The (fovea, context) pair from the fused op equals splitting the normalised 178 clip."""
    torch.manual_seed(0)
    model = build("early_fusion", num_classes=3, multires=True, width=1 / 16).eval()
    frames = torch.randint(0, 256, (2, 10, 178, 178, 3), dtype=torch.uint8)
    clip = vidconv.ops.crop_normalize(frames, 178)
    pair = vidconv.ops.fovea_context(frames, 89)
    torch.testing.assert_close(model(pair), model(clip), rtol=1e-4, atol=1e-5)


def test_features_layer_groups_reset_and_dropout():
    torch.manual_seed(0)
    model = build("slow_fusion", num_classes=7, multires=True, width=1 / 16)
    model.eval()
    x = clip_for(model)
    feats = model.features(x)
    assert feats.shape == (2, model.fc2.out_features) and (feats >= 0).all()
    torch.testing.assert_close(model.classifier(feats), model(x))

    groups = model.layer_groups()
    assert [g for g, _ in groups] == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2",
                                      "classifier"]
    grouped = [id(p) for _, m in groups for p in m.parameters()]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    # A two-stream conv group holds both streams' stage.
    assert len(list(groups[0][1].parameters())) == 4

    model.reset_classifier(5)
    assert model.classifier.out_features == model.num_classes == 5
    assert model(x).shape == (2, 5)
    assert model.complexity()["params"] == sum(p.numel() for p in model.parameters())

    model.set_dropout(0.9)
    assert [d.p for d in (model.drop1, model.drop2, model.drop3)] == [0.9] * 3
    model.train()
    assert not torch.equal(model.features(x), model.features(x))  # dropout is active


@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_clip_shape_says_what_is_expected(arch):
    model = meta_model(arch, False, "both")
    t = FRAMES_IN[arch]
    expected = rf"\(N, 3, {t}, 170, 170\)"
    for shape in [(1, 3, t + 1, 170, 170), (1, 3, t, 178, 178), (1, 1, t, 170, 170),
                  (3, t, 170, 170)]:
        with pytest.raises(ValueError, match=expected):
            model(torch.empty(shape, device="meta"))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, t, 170, 170, dtype=torch.uint8))
    with pytest.raises(ValueError, match=expected):
        model((torch.empty(1, 3, t, 89, 89), torch.empty(1, 3, t, 89, 89)))


def test_multires_bad_inputs():
    model = meta_model("slow_fusion", True, "both")
    with pytest.raises(ValueError, match=r"\(N, 3, 10, 178, 178\).*\(N, 3, 10, 89, 89\)"):
        model(torch.empty(1, 3, 10, 170, 170, device="meta"))
    # A lone 89x89 stream is ambiguous for a two-stream model.
    with pytest.raises(ValueError, match="89"):
        model(torch.empty(1, 3, 10, 89, 89, device="meta"))
    good = torch.empty(1, 3, 10, 89, 89, device="meta")
    with pytest.raises(ValueError, match="context shape"):
        model((good, torch.empty(1, 3, 9, 89, 89, device="meta")))
    with pytest.raises(ValueError, match="3 items"):
        model((good, good, good))


def test_bad_build_arguments():
    with pytest.raises(ValueError, match="needs multires=True"):
        build("single_frame", stream="fovea")
    with pytest.raises(ValueError, match="stream must be one of"):
        build("single_frame", multires=True, stream="periphery")
    with pytest.raises(ValueError, match="width"):
        build("single_frame", width=0)
    with pytest.raises(ValueError, match="dropout"):
        build("single_frame", dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        build("single_frame", num_classes=0)
    model = build("single_frame", width=1 / 16)
    with pytest.raises(ValueError, match="p must be"):
        model.set_dropout(-0.1)
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(width=float("inf")), ValueError, r"width must be in \(0, 4\].*got inf"),
    (dict(width=float("nan")), ValueError, r"width must be in \(0, 4\].*got nan"),
    (dict(width=4.5), ValueError, r"width must be in \(0, 4\].*got 4.5"),
    (dict(width=1e6), ValueError, "width must be in"),
    (dict(width=-1.0), ValueError, "width must be in"),
    (dict(width="0.25"), TypeError, r"width must be a real number, got '0.25' \(str\)"),
    (dict(width=True), TypeError, r"width must be a real number, got True \(bool\)"),
    (dict(multires="no"), TypeError, r"multires must be True or False, got 'no' \(str\)"),
    (dict(multires=1), TypeError, r"multires must be True or False, got 1 \(int\)"),
    (dict(multires=None), TypeError, "multires must be True or False, got None"),
    (dict(num_classes=True), TypeError, r"num_classes must be an int, got True \(bool\)"),
    (dict(num_classes=10.0), TypeError, r"num_classes must be an int, got 10.0 \(float\)"),
    (dict(num_classes=-3), ValueError, r"num_classes must be >= 1, got -3"),
    (dict(dropout=float("nan")), ValueError, "dropout must be a drop probability"),
    (dict(dropout="0.5"), TypeError, r"dropout must be a real number, got '0.5'"),
    (dict(stream=None), ValueError, "stream must be one of both, fovea, context, got None"),
])
def test_build_argument_errors_name_the_argument(kwargs, error, match):
    # The checks run before any layer is built, so even absurd widths fail at once.
    with pytest.raises(error, match=match):
        build("single_frame", **kwargs)


def test_build_takes_numpy_numbers():
    model = build("single_frame", num_classes=np.int64(5), multires=np.bool_(True),
                  width=np.float32(1 / 16), dropout=np.float64(0.25))
    assert model.num_classes == 5 and model.multires is True
    assert model.width == pytest.approx(1 / 16) and model.drop1.p == 0.25
    with torch.device("meta"):
        widest = build("late_fusion", width=4)  # the bound itself is allowed
    assert widest.width == 4.0
    model.reset_classifier(np.int32(3))
    assert model.num_classes == 3
    model.set_dropout(np.float32(0.5))
    assert model.drop1.p == 0.5 and type(model.drop1.p) is float
    with pytest.raises(TypeError, match="num_classes must be an int"):
        model.reset_classifier(2.0)
    with pytest.raises(TypeError, match="p must be a real number"):
        model.set_dropout(None)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("size,beta", [(5, 0.5), (4, 0.75), (3, 0.5)])
def test_local_response_norm_matches_torch(size, beta, memory_format):
    from vidconv.models.tower import LocalResponseNorm

    torch.manual_seed(0)
    ours = LocalResponseNorm(size, alpha=0.3, beta=beta, k=2.0)
    theirs = nn.LocalResponseNorm(size, alpha=0.3, beta=beta, k=2.0)
    x = (3 * torch.randn(2, 7, 3, 5, 4, dtype=torch.float64)).contiguous(
        memory_format=memory_format)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want, got = theirs(x1), ours(x2)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(x2.grad, x1.grad)
    # Other ranks use torch's own implementation.
    flat = torch.randn(2, 7, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(flat), theirs(flat))


def test_compiles_as_one_graph():
    torch.manual_seed(0)
    model = build("slow_fusion", num_classes=3, multires=True, width=1 / 16).eval()
    clip = clip_for(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(clip), model(clip))
