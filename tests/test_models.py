"""Reference HRNet models (`hrfast.models`) and the MAC counter (`hrfast.flops`).

- parameter counts against the HRNet papers' tables (where the official architecture gives them);
- classifier state_dict keys and shapes against timm (same names, same order), timm weights loaded with
  strict=True giving the same logits;
- structure and attribute names of the official MSRA code; forward shapes on the CPU for every builder;
- MAC counts: HRNetV2-W48 at 1024x2048 within 1% of the paper's 747.3 GFLOPs, W40 at its official figures,
  meta-device count equal to a real one, and the head-reordering saving.

Big models are built under ``torch.device("meta")`` where only shapes matter.
"""
import functools

import pytest
import torch
import torch.nn as nn

from hrfast import flops
from hrfast.flops import branch_sizes, count_macs, head_reorder_macs, register_mac_rule
from hrfast.models import (TIMM_NAMES, HRNetClassifier, HRNetV2Landmarks, HRNetV2Segmentation, PoseHRNet,
                           build_model, list_models, stage_config)
from hrfast.models import cls_hrnet, pose_hrnet, seg_hrnet
from hrfast.models.configs import branch_channels

SEG = list_models("seg")
CLS = list_models("cls")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run the CPU forwards on one thread: on a busy 2-core machine, intra-op threads contend and the many tiny
    convs of an HRNet at 64x64 take ~100x longer (20 s instead of 0.15 s for W18)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _meta_model(name, kwargs):
    with torch.device("meta"):
        return build_model(name, **dict(kwargs))


def meta_model(name, **kwargs):
    """`build_model` on the meta device (cached: tests must not modify it)."""
    return _meta_model(name, tuple(sorted(kwargs.items())))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def randomize_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
                m.running_mean.normal_(0.0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)


# ------------------------------------------------------------------------------------------------ registry


def test_registry_names():
    assert SEG == [f"hrnetv2_{w}_seg" for w in ("w18_small_v1", "w18_small_v2", "w18", "w32", "w40", "w48", "w64")]
    assert CLS == [f"hrnet_{w}_c" for w in ("w18_small_v1", "w18_small_v2", "w18", "w30", "w32", "w40", "w44",
                                             "w48", "w64")]
    assert list_models("face") == ["hrnetv2_w18_face"]
    assert list_models("pose") == ["hrnet_w32_pose", "hrnet_w48_pose"]
    assert list_models() == SEG + ["hrnetv2_w18_face"] + CLS + list_models("pose")
    assert set(TIMM_NAMES) == set(CLS)


def test_unknown_names_raise_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'hrnet_w99'.*hrnetv2_w48_seg.*hrnet_w18_c"):
        build_model("hrnet_w99")
    with pytest.raises(ValueError, match="seg, cls, face, pose"):
        list_models("detection")
    with pytest.raises(ValueError, match="w18_small_v1"):
        stage_config("w99")
    with pytest.raises(TypeError):
        build_model("hrnet_w18_c", align_corners=True)  # not a classifier argument


# ----------------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name, millions", [
    ("hrnetv2_w48_seg", 65.9),  # paper, Cityscapes (19 classes)
    ("hrnet_w18_c", 21.3), ("hrnet_w30_c", 37.7), ("hrnet_w40_c", 57.6),  # paper, ImageNet
    ("hrnet_w32_pose", 28.5), ("hrnet_w48_pose", 63.6),  # paper, COCO 256x192 (17 joints)
])
def test_param_counts_match_paper(name, millions):
    assert round(n_params(meta_model(name)) / 1e6, 1) == millions


def test_param_counts_official():
    # the official HRNet-Image-Classification summary of HRNet-W18-C prints "Total Parameters: 21,299,004"
    assert n_params(meta_model("hrnet_w18_c")) == 21_299_004
    # HRNetV2-W40: the paper's row says 45.2M; the official architecture has 45.89M (19 classes)
    assert round(n_params(meta_model("hrnetv2_w40_seg")) / 1e6, 2) == 45.89


def test_num_classes_changes_only_the_classifier():
    base = n_params(meta_model("hrnetv2_w18_seg"))
    assert n_params(meta_model("hrnetv2_w18_seg", num_classes=21)) - base == 2 * (270 + 1)
    base = n_params(meta_model("hrnet_w18_small_v1_c"))
    assert n_params(meta_model("hrnet_w18_small_v1_c", num_classes=10)) - base == -990 * (2048 + 1)


# ------------------------------------------------------------------------------------------------- vs timm


@pytest.mark.parametrize("timm_name", ["hrnet_w18_small", "hrnet_w18_small_v2", "hrnet_w18", "hrnet_w48"])
def test_classifier_state_dict_matches_timm(timm_name):
    timm = pytest.importorskip("timm")
    ours_name = next(k for k, v in TIMM_NAMES.items() if v == timm_name)
    with torch.device("meta"):
        ours = build_model(ours_name).state_dict()
        theirs = timm.create_model(timm_name, pretrained=False).state_dict()
    assert list(ours) == list(theirs)  # same keys, same order: conv1 ... stage4, incre/downsamp/final, classifier
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    prefixes = {k.split(".")[0] for k in ours}
    assert prefixes == {"conv1", "bn1", "conv2", "bn2", "layer1", "transition1", "stage2", "transition2", "stage3",
                        "transition3", "stage4", "incre_modules", "downsamp_modules", "final_layer", "classifier"}


@pytest.mark.parametrize("timm_name", ["hrnet_w18_small", "hrnet_w18_small_v2"])
def test_timm_weights_load_strict_and_give_the_same_logits(timm_name):
    timm = pytest.importorskip("timm")
    ours_name = next(k for k, v in TIMM_NAMES.items() if v == timm_name)
    theirs = timm.create_model(timm_name, pretrained=False).eval()
    randomize_norms(theirs)
    ours = build_model(ours_name).eval()
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.shape == (2, 1000)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-6, atol=1e-6 * y_theirs.abs().max().item())


# ------------------------------------------------------------------------------------- official structure


def _hr_modules(model):
    return [m for m in model.modules() if type(m).__name__ == "HighResolutionModule"]


@pytest.mark.parametrize("name, modules", [("hrnetv2_w18_small_v1_seg", 3), ("hrnetv2_w18_small_v2_seg", 6),
                                           ("hrnetv2_w48_seg", 8), ("hrnet_w18_small_v1_c", 3), ("hrnet_w32_c", 8)])
def test_official_structure(name, modules):
    model = meta_model(name)
    children = [n for n, _ in model.named_children()]
    trunk = ["conv1", "bn1", "conv2", "bn2", "relu", "layer1", "transition1", "stage2", "transition2", "stage3",
             "transition3", "stage4"]
    head = ["last_layer"] if name.endswith("_seg") else ["incre_modules", "downsamp_modules", "final_layer",
                                                          "classifier"]
    assert children == trunk + head
    hr = _hr_modules(model)
    assert len(hr) == modules
    seg = name.endswith("_seg")
    for m in hr:
        assert isinstance(m, seg_hrnet.HighResolutionModule if seg else cls_hrnet.HighResolutionModule)
        n = m.num_branches
        assert len(m.branches) == n and len(m.num_inchannels) == n and m.fuse_method == "SUM"
        assert m.multi_scale_output and len(m.fuse_layers) == n
        assert isinstance(m.relu, nn.ReLU) and m.relu.inplace == seg
        for i in range(n):
            for j in range(n):
                f = m.fuse_layers[i][j]
                if i == j:
                    assert f is None
                elif j > i:
                    assert isinstance(f[0], nn.Conv2d) and f[0].kernel_size == (1, 1) and f[0].bias is None
                    assert f[0].in_channels == m.num_inchannels[j] and f[0].out_channels == m.num_inchannels[i]
                    if seg:  # resized in forward with F.interpolate, as the official segmentation code
                        assert len(f) == 2
                    else:
                        assert len(f) == 3 and isinstance(f[2], nn.Upsample)
                        assert f[2].mode == "nearest" and f[2].scale_factor == 2 ** (j - i)
                else:
                    assert len(f) == i - j
                    for k, link in enumerate(f):
                        assert link[0].stride == (2, 2) and link[0].kernel_size == (3, 3)
                        assert len(link) == (2 if k == i - j - 1 else 3)
    # transitions: None for an unchanged branch, a new branch from the lowest one
    assert model.transition2[0] is None and model.transition2[1] is None
    assert model.transition2[2][0][0].stride == (2, 2)
    assert model.stage4_cfg["NUM_BRANCHES"] == 4


def test_segmentation_head_layout():
    model = meta_model("hrnetv2_w48_seg", num_classes=19)
    conv, bn, relu, cls = model.last_layer
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias is not None) == (720, 720, (1, 1), True)
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 720 and isinstance(relu, nn.ReLU)
    assert (cls.in_channels, cls.out_channels, cls.kernel_size, cls.bias is not None) == (720, 19, (1, 1), True)
    assert branch_channels(stage_config("w48")) == [48, 96, 192, 384]


def test_align_corners_is_a_constructor_argument_not_a_global():
    assert not hasattr(seg_hrnet, "ALIGN_CORNERS")  # the official module global
    a = build_model("hrnetv2_w18_small_v1_seg")
    b = build_model("hrnetv2_w18_small_v1_seg", align_corners=True)
    assert a.align_corners is False and b.align_corners is True
    assert all(m.align_corners is False for m in _hr_modules(a))  # building b left a alone
    assert all(m.align_corners is True for m in _hr_modules(b))
    b.load_state_dict(a.state_dict())
    randomize_norms(a)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ya, yb = a(x), b(x)
        b.align_corners = False
        for m in _hr_modules(b):
            m.align_corners = False
        yb_false = b(x)
    assert not torch.allclose(ya, yb)
    torch.testing.assert_close(ya, yb_false, rtol=0, atol=0)


def test_face_model_layout():
    model = meta_model("hrnetv2_w18_face", num_joints=98)
    assert isinstance(model, HRNetV2Landmarks)
    keys = list(model.state_dict())
    assert keys[-1] == "head.3.bias" and "head.0.bias" in keys and not any(k.startswith("last_layer") for k in keys)
    conv, bn, _, cls = model.head
    assert (conv.in_channels, cls.out_channels) == (270, 98) and conv.bias is not None
    assert all(m.momentum == 0.01 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.align_corners is False for m in _hr_modules(model))
    assert isinstance(model.sf, nn.Softmax)
    with pytest.raises(ValueError, match="stage 1"):
        HRNetV2Landmarks(config=stage_config("w18_small_v1"))


def test_bn_momentum_argument():
    for name, default in (("hrnetv2_w18_small_v1_seg", 0.1), ("hrnet_w18_small_v1_c", 0.1)):
        for momentum in (default, 0.01):
            model = meta_model(name, bn_momentum=momentum)
            assert all(m.momentum == momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# ---------------------------------------------------------------------------------------- forward on CPU


@pytest.mark.parametrize("name", list_models())
def test_forward_shapes_on_cpu(name):
    model = build_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
    expected = {"seg": (2, 19, 16, 16), "face": (2, 98, 16, 16), "pose": (2, 17, 16, 16)}.get(
        name.rsplit("_", 1)[1], (2, 1000))
    assert y.shape == expected and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["hrnetv2_w18_small_v2_seg", "hrnetv2_w18_face"])
def test_bilinear_models_take_any_size(name):
    model = build_model(name).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 67, 101))
    assert y.shape[-2:] == (17, 26)  # ceil(H / 4): two stride-2 convs with padding 1


def test_segmentation_forward_is_the_official_concat_head():
    model = build_model("hrnetv2_w18_small_v1_seg", align_corners=True).eval()
    randomize_norms(model)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_backbone(x)
        assert [tuple(f.shape[1:]) for f in feats] == [(16, 16, 24), (32, 8, 12), (64, 4, 6), (128, 2, 3)]
        ups = [nn.functional.interpolate(f, size=(16, 24), mode="bilinear", align_corners=True) for f in feats[1:]]
        expected = model.last_layer(torch.cat([feats[0], *ups], 1))
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_classes_are_exported():
    assert isinstance(meta_model("hrnetv2_w18_seg"), HRNetV2Segmentation)
    assert isinstance(meta_model("hrnet_w18_c"), HRNetClassifier)
    assert isinstance(meta_model("hrnet_w32_pose"), PoseHRNet)


def test_pose_model_layout():
    """Official pose_hrnet.py: hard-coded stage 1, nearest upsampling in fuse_layers, in-place fuse ReLU, the
    last stage-4 module with one output row, `final_layer` a 1x1 conv with bias on branch 0, official keys."""
    model = meta_model("hrnet_w32_pose")
    assert [type(b).__name__ for b in model.layer1] == ["Bottleneck"] * 4
    last = model.stage4[-1]
    assert type(last) is pose_hrnet.HighResolutionModule and len(last.fuse_layers) == 1
    assert not last.multi_scale_output and all(m.multi_scale_output for m in model.stage4[:-1])
    assert isinstance(last.fuse_layers[0][1][2], nn.Upsample) and last.fuse_layers[0][1][2].mode == "nearest"
    assert last.relu.inplace
    assert (model.final_layer.in_channels, model.final_layer.out_channels) == (32, 17)
    assert model.final_layer.kernel_size == (1, 1) and model.final_layer.bias is not None
    keys = list(model.state_dict())
    assert keys[:2] == ["conv1.weight", "bn1.weight"] and keys[-2:] == ["final_layer.weight", "final_layer.bias"]
    assert "stage4.2.fuse_layers.0.3.1.running_var" in keys and "stage4.2.fuse_layers.1.0.0.0.weight" not in keys
    with pytest.raises(ValueError, match="hard-codes stage 1"):
        PoseHRNet(stage_config("w18_small_v1"))


# ------------------------------------------------------------------------------------------------ MACs


def test_w48_segmentation_macs_match_the_paper():
    model = meta_model("hrnetv2_w48_seg")
    count = count_macs(model, (1, 3, 1024, 2048))
    assert abs(count.gmacs - 747.3) / 747.3 < 0.01
    assert round(count.gmacs, 1) == 747.5  # official architecture, counted here
    assert count.linear == 0 and count.total == count.conv
    # FlopCounterMode (2 FLOPs per MAC) sees the same convolutions
    assert count_macs(model, (1, 3, 1024, 2048), method="flop_counter").total == count.total


def test_w40_segmentation_official_figures():
    # paper row: 45.2M / 493.2 GFLOPs; the official architecture gives 45.89M / 535.4 GMACs
    model = meta_model("hrnetv2_w40_seg")
    assert round(count_macs(model, (1, 3, 1024, 2048)).gmacs, 1) == 535.4


def test_classifier_macs_in_the_classification_unit():
    count = count_macs(meta_model("hrnet_w18_c"), (1, 3, 224, 224))
    assert round(count.gibi_macs, 2) == 3.99  # the paper's HRNet-W18-C figure (MACs / 2**30)
    assert count.linear == 2048 * 1000


def test_meta_count_equals_a_real_count():
    model = build_model("hrnetv2_w18_small_v2_seg")
    model.train()
    model.layer1.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    real = count_macs(model, (1, 3, 64, 96), device="cpu", count_other=True)
    meta = count_macs(model, (1, 3, 64, 96), count_other=True)
    assert real.total == meta.total > 0
    assert real.per_module == meta.per_module
    assert real.other == meta.other and real.other["upsample_bilinear2d"] > 0
    assert count_macs(model, (1, 3, 64, 96), device="cpu", method="flop_counter").total == real.total
    # the model is left as it was: training flags, device, running statistics
    assert model.training and not model.layer1.training and model.stage2.training
    assert next(model.parameters()).device.type == "cpu"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_macs_per_module_add_up():
    count = count_macs(meta_model("hrnet_w18_small_v1_c"), (1, 3, 224, 224))
    assert sum(m for _, _, m in count.per_module) == count.total
    parts = count.by_prefix()
    assert sum(parts.values()) == count.total and parts["classifier"] == 2048 * 1000
    conv1 = count.per_module[0]
    assert conv1[:2] == ("conv1", "Conv2d") and conv1[2] == 64 * 3 * 9 * 112 * 112


def test_mac_rule_replaces_the_children_count():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Block())
    plain = count_macs(model, (1, 3, 8, 8))
    assert plain.conv == 4 * 3 * 64 + 8 * 4 * 9 * 64
    register_mac_rule(Block, lambda module, inputs, output: 7)
    try:
        ruled = count_macs(model, (1, 3, 8, 8))
    finally:
        register_mac_rule(Block, None)
    assert (ruled.conv, ruled.ruled, ruled.total) == (4 * 3 * 64, 7, 4 * 3 * 64 + 7)
    assert Block not in flops._RULES
    with pytest.raises(TypeError):
        register_mac_rule(int, None)
    with pytest.raises(ValueError, match="method"):
        count_macs(model, (1, 3, 8, 8), method="fvcore")


def test_branch_sizes_follow_the_model():
    model = meta_model("hrnetv2_w18_small_v1_seg")
    for size in ((1024, 2048), (67, 101)):
        with torch.no_grad():
            feats = model.forward_backbone(torch.empty(1, 3, *size, device="meta"))
        assert [tuple(f.shape[-2:]) for f in feats] == branch_sizes(size)


def test_head_reordering_saving_w48():
    head = head_reorder_macs((48, 96, 192, 384), (1024, 2048), 19)
    assert head.sizes == ((256, 512), (128, 256), (64, 128), (32, 64))
    assert head.eager_conv == 256 * 512 * 720 * 720
    # W_0 x_0 + W_1 x_1 / 4 + ...: 720 * (48 + 96/4 + 192/16 + 384/64) = 720 * 90 per full-res pixel
    assert sum(head.reordered_conv) == 256 * 512 * 720 * 90 and head.conv_ratio == 8.0
    assert head.classifier == 256 * 512 * 720 * 19
    assert round(head.ratio, 2) == 6.78  # the "about 6.8x" of DESIGN.md: 1x1 conv and classifier together
    assert head.saved == head.eager - head.reordered
    # the eager figure is what the counter sees in the model's last_layer
    count = count_macs(meta_model("hrnetv2_w48_seg"), (1, 3, 1024, 2048))
    assert count.by_prefix()["last_layer"] == head.eager
    with pytest.raises(ValueError, match="branch resolutions"):
        head_reorder_macs((48, 96), (64, 64), 19, branch_resolutions=[(16, 16)])
