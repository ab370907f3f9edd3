"""The Xception network: parameter counts derived by hand from the paper's Figure 5, every knob of
XceptionConfig, input checks, the timm-style API, Keras module names and TorchScript."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import relative_error
from torch import nn

import xception
from xception import MaxPool2dSame, SeparableConv2d, create_model

# --- the paper's network, by hand -----------------------------------------------------------------

# (in, out) of every separable convolution of Figure 5: entry flow, 8 middle modules, exit flow.
ENTRY_SEPCONVS = [(64, 128), (128, 128), (128, 256), (256, 256), (256, 728), (728, 728)]
MIDDLE_MODULE_SEPCONVS = [(728, 728)] * 3
EXIT_SEPCONVS = [(728, 728), (728, 1024), (1024, 1536), (1536, 2048)]
SEPCONVS = ENTRY_SEPCONVS + 8 * MIDDLE_MODULE_SEPCONVS + EXIT_SEPCONVS
SHORTCUTS = [(64, 128), (128, 256), (256, 728), (728, 1024)]  # 1x1 stride-2 convs, each followed by BN

STEM = 3 * 3 * 3 * 32 + 2 * 32 + 3 * 3 * 32 * 64 + 2 * 64
SEPCONV_PARAMS = sum(9 * cin + cin * cout + 2 * cout for cin, cout in SEPCONVS)  # depthwise, pointwise, BN
SHORTCUT_PARAMS = sum(cin * cout + 2 * cout for cin, cout in SHORTCUTS)
CLASSIFIER = 2048 * 1000 + 1000
MIDDLE_MODULE = 3 * (9 * 728 + 728 * 728) + 3 * 2 * 728


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """The tensors here are small (see conftest's one_thread)."""


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def images(n: int = 2, size: tuple[int, int] = (71, 71), channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, *size, generator=torch.Generator().manual_seed(seed))


def small(**kwargs) -> xception.Xception:
    """A cheap model: no middle flow."""
    kwargs.setdefault("middle_repeats", 0)
    return create_model("xception", **kwargs).eval()


def calibrated(net: xception.Xception, seed: int = 1) -> xception.Xception:
    """BatchNorm statistics measured on a batch (eval mode). Freshly initialised statistics (mean 0, variance 1)
    do not match the activations, and such a deep network's output then hardly depends on its input."""
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: one pass gives the batch statistics
    with torch.no_grad():
        net.train()(images(8, (net.min_input_size, net.min_input_size), net.in_chans, seed=seed))
    return net.eval()


@pytest.fixture(scope="module")
def model() -> xception.Xception:
    torch.manual_seed(0)
    return create_model("xception").eval()


def test_hand_count_is_the_published_one() -> None:
    assert STEM + SEPCONV_PARAMS + SHORTCUT_PARAMS + CLASSIFIER == 22_855_952


def test_parameter_count(model) -> None:
    assert n_params(model) == 22_855_952
    assert n_params(create_model("xception", num_classes=0)) == 22_855_952 - CLASSIFIER == 20_806_952


def test_batchnorm_buffers(model) -> None:
    channels = 32 + 64 + sum(cout for _, cout in SEPCONVS) + sum(cout for _, cout in SHORTCUTS)
    stats = sum(b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var")))
    assert stats == 2 * channels == 54_528


def test_features_and_pooling() -> None:
    with torch.no_grad():
        assert create_model("xception", num_classes=0).eval()(images(2)).shape == (2, 2048)
    # The pooled shapes and the pooling do not depend on the middle flow: a cheap model from here on.
    features = calibrated(small(num_classes=0))
    full_maps = small(num_classes=0, global_pool="")
    max_pooled = small(num_classes=0, global_pool="max")
    full_maps.load_state_dict(features.state_dict())
    max_pooled.load_state_dict(features.state_dict())
    x = images(2, (71, 71))
    with torch.no_grad():
        pooled = features(x)
        fmap = full_maps(x)
        assert pooled.shape == (2, 2048) and fmap.shape == (2, 2048, 3, 3)
        torch.testing.assert_close(pooled, fmap.mean((2, 3)))
        maxed = max_pooled(x)
        torch.testing.assert_close(maxed, fmap.amax((2, 3)))
        assert relative_error(maxed, pooled) > 0.05
        assert full_maps(images(1, (240, 320))).shape == (1, 2048, 8, 10)


def test_feature_map_at_299() -> None:
    features = small(num_classes=0, global_pool="")  # the spatial size does not depend on the middle flow
    with torch.no_grad():
        assert features(images(1, (299, 299))).shape == (1, 2048, 10, 10)


def test_feature_map_needs_num_classes_0() -> None:
    with pytest.raises(ValueError, match="num_classes=0"):
        create_model("xception", global_pool="")
    with pytest.raises(ValueError, match="global_pool must be one of"):
        create_model("xception", global_pool="mean")


# --- knobs ----------------------------------------------------------------------------------------


def test_middle_repeats_adds_modules_of_known_size() -> None:
    base = n_params(small())
    assert base == 22_855_952 - 8 * MIDDLE_MODULE
    assert n_params(small(middle_repeats=1)) == base + MIDDLE_MODULE
    assert n_params(small(middle_repeats=3)) == base + 3 * MIDDLE_MODULE
    names = [name for name, _ in small(middle_repeats=2).blocks.named_children()]
    assert names == [f"block{i}" for i in range(1, 9)]


def test_widths() -> None:
    stem, entry, exit_, tail = (8, 16), (24, 40), (48, 56), (64, 80)
    net = small(stem_widths=stem, entry_widths=entry, exit_widths=exit_, tail_widths=tail, num_classes=5)
    seps = [(16, 24), (24, 24), (24, 40), (40, 40), (40, 48), (48, 56), (56, 64), (64, 80)]
    shortcuts = [(16, 24), (24, 40), (40, 56)]
    expected = (3 * 9 * 8 + 2 * 8 + 8 * 9 * 16 + 2 * 16 + sum(9 * i + i * o + 2 * o for i, o in seps)
                + sum(i * o + 2 * o for i, o in shortcuts) + 80 * 5 + 5)
    assert n_params(net) == expected
    assert net.num_features == 80 and net.head_hidden_size == 80
    # Three downsampling modules instead of four: the smallest input with a 3x3 final map is 39.
    assert net.min_input_size == 39
    with torch.no_grad():
        assert net.forward_features(images(1, (39, 39))).shape == (1, 80, 3, 3)
        assert net(images(1, (39, 40))).shape == (1, 5)
    with pytest.raises(ValueError, match="39"):
        net(images(1, (38, 39)))


def test_min_input_size_is_keras_71() -> None:
    assert small().min_input_size == 71
    # With 5 downsampling modules: the smallest side that halves (rounding up) to 3 five times, then the
    # smallest input whose two valid stem convs ((n - 3) // 2 + 1 - 2) give that side.
    side = 3
    for _ in range(5):
        side = 2 * side - 1
    smallest = 2 * (side + 2 - 1) + 3  # invert the two valid stem convs
    assert small(entry_widths=(16, 32, 64, 128)).min_input_size == smallest == 135


def test_residual_false_removes_exactly_the_shortcuts() -> None:
    model, plain = calibrated(small()), small(residual=False)
    assert n_params(model) - n_params(plain) == SHORTCUT_PARAMS
    assert SHORTCUT_PARAMS == 64 * 128 + 128 * 256 + 256 * 728 + 728 * 1024 + 2 * (128 + 256 + 728 + 1024)
    assert not [name for name, _ in plain.named_modules() if "shortcut" in name]
    missing = set(model.state_dict()) - set(plain.state_dict())
    assert all(".shortcut." in key for key in missing) and len(missing) == 4 * (1 + 5)  # conv; BN: 4 + counter
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    with torch.no_grad():
        x = images()
        out = plain(x)
        assert out.shape == (2, 1000) and torch.isfinite(out).all()
        assert relative_error(out, model(x)) > 0.05
        assert n_params(create_model("xception", residual=False)) == 22_855_952 - SHORTCUT_PARAMS


def block_layers(net: xception.Xception) -> dict[str, list[str]]:
    return {name: [n for n, _ in block.layers.named_children()] for name, block in net.blocks.named_children()
            if name != "block1"}


def test_residual_false_keeps_each_modules_layers() -> None:
    # Without shortcuts block2 is still an entry-flow module (no ReLU after its last BN), not block14's
    # SepConv-BN-ReLU form, although neither starts with a ReLU nor has a shortcut.
    layers = block_layers(small())
    assert block_layers(small(residual=False)) == layers
    assert layers["block2"] == ["sepconv1", "sepconv1_bn", "sepconv2_act", "sepconv2", "sepconv2_bn", "pool"]
    last = list(layers.values())[-1]  # block14 of the full network
    assert last == ["sepconv1", "sepconv1_bn", "sepconv1_act", "sepconv2", "sepconv2_bn", "sepconv2_act"]


@pytest.mark.parametrize("mid", ["relu", "elu"])
def test_mid_activation_changes_outputs_not_counts(mid: str) -> None:
    model = calibrated(small(middle_repeats=1))
    activated = small(middle_repeats=1, mid_activation=mid)
    assert n_params(activated) == n_params(model)
    activated.load_state_dict(model.state_dict())
    assert isinstance(activated.blocks.block5.layers.sepconv2.mid, nn.ReLU if mid == "relu" else nn.ELU)
    assert isinstance(model.blocks.block5.layers.sepconv2.mid, nn.Identity)
    with torch.no_grad():
        x = images()
        assert relative_error(activated(x), model(x)) > 0.05


def test_mid_bn_adds_two_per_channel() -> None:
    # depthwise first: the mid BN normalises the depthwise output, the separable conv's input channels
    assert n_params(create_model("xception", mid_activation="bn")) == 22_855_952 + sum(2 * i for i, _ in SEPCONVS)
    net = small(mid_activation="bn", order="pointwise_first", num_classes=0)
    seps = ENTRY_SEPCONVS + EXIT_SEPCONVS
    expected = STEM + SHORTCUT_PARAMS + sum(i * o + 9 * o + 2 * o + 2 * o for i, o in seps)
    assert n_params(net) == expected


def test_pointwise_first_order() -> None:
    net = create_model("xception", order="pointwise_first", num_classes=0).eval()
    expected = STEM + SHORTCUT_PARAMS + sum(i * o + 9 * o + 2 * o for i, o in SEPCONVS)
    assert n_params(net) == expected
    assert net.blocks.block2.layers.sepconv1.depthwise.weight.shape == (128, 1, 3, 3)
    with torch.no_grad():
        assert net(images(1)).shape == (1, 2048)


def test_segments() -> None:
    net = small(segments=4, num_classes=0)
    seps = ENTRY_SEPCONVS + EXIT_SEPCONVS
    # the spatial conv over `in` channels in 4 groups has 9 * in * in / 4 weights
    expected = STEM + SHORTCUT_PARAMS + sum(9 * i * i // 4 + i * o + 2 * o for i, o in seps)
    assert n_params(net) == expected
    with torch.no_grad():
        assert net(images(1)).shape == (1, 2048)
    with pytest.raises(ValueError, match="segments must divide"):
        small(segments=3)


def test_fc_layers() -> None:
    fc = (4096, 4096)
    features = n_params(small(num_classes=0))
    hidden = small(num_classes=0, fc_layers=fc)
    assert n_params(hidden) == features + 2048 * 4096 + 4096 + 4096 * 4096 + 4096
    assert hidden.head_hidden_size == 4096
    net = small(num_classes=7, fc_layers=(32, 16))
    assert net.get_classifier().in_features == 16 and net.head_hidden_size == 16 and net.num_features == 2048
    assert n_params(net) == n_params(small(num_classes=0)) + 2048 * 32 + 32 + 32 * 16 + 16 + 16 * 7 + 7
    with torch.no_grad():
        x = images(2)
        assert net(x).shape == (2, 7)
        assert net.forward_head(net.forward_features(x), pre_logits=True).shape == (2, 16)
    with pytest.raises(ValueError, match="fc_layers need a global_pool"):
        create_model("xception", num_classes=0, global_pool="", fc_layers=(8,))


def test_dropout_only_in_training() -> None:
    net = small(drop_rate=0.5, num_classes=0)
    x = images(2)
    with torch.no_grad():
        net.train()
        assert not torch.equal(net(x), net(x))
        net.eval()
        torch.testing.assert_close(net(x), net(x), rtol=0, atol=0)


def test_dropout_zeroes_about_half_of_pre_logits() -> None:
    net = small(drop_rate=0.5)
    fmap = torch.rand(16, 2048, 3, 3) + 0.1  # positive: every pooled feature is non-zero
    with torch.no_grad():
        net.eval()
        reference = net.forward_head(fmap, pre_logits=True)
        torch.testing.assert_close(reference, fmap.mean((2, 3)))
        net.train()
        dropped = net.forward_head(fmap, pre_logits=True)
    zero = dropped == 0
    assert 0.45 < zero.float().mean().item() < 0.55
    # inverted dropout: the survivors are scaled by 1 / (1 - p)
    torch.testing.assert_close(dropped[~zero], 2 * reference[~zero])
    with torch.no_grad():
        assert (small(drop_rate=0.0).train().forward_head(fmap, pre_logits=True) != 0).all()


def test_numerics() -> None:
    for numerics, eps, momentum, pool in (("keras", 1e-3, 0.01, MaxPool2dSame), ("timm", 1e-5, 0.1, nn.MaxPool2d)):
        net = small(numerics=numerics)
        norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms and all(m.eps == eps and m.momentum == momentum for m in norms)
        pools = [m for m in net.modules() if isinstance(m, (MaxPool2dSame, nn.MaxPool2d))]
        assert len(pools) == 4 and all(type(m) is pool for m in pools)
    keras_net = calibrated(small(num_classes=0, global_pool=""))
    timm_net = small(numerics="timm", num_classes=0, global_pool="")
    timm_net.load_state_dict(keras_net.state_dict())
    x = images(2, (71, 71))
    with torch.no_grad():
        assert relative_error(timm_net(x), keras_net(x)) > 1e-3  # eps alone changes the output
        for module in timm_net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps = 1e-3
        # Odd sizes at every pooling (71 -> 33, 17, 9, 5): both poolings pad one each side and agree.
        torch.testing.assert_close(timm_net(x), keras_net(x))
        # Even sizes (80 -> 37, 19, 10, 5): TensorFlow pads after, PyTorch on both sides.
        x = images(2, (80, 80))
        assert relative_error(timm_net(x), keras_net(x)) > 0.05


def test_bn_momentum_reaches_every_batch_norm() -> None:
    config = xception.XceptionConfig(numerics="timm", bn_momentum=0.3)
    made = config.norm_layer()(8)
    assert isinstance(made, nn.BatchNorm2d) and made.num_features == 8 and (made.eps, made.momentum) == (1e-5, 0.3)
    net = small(numerics="timm", bn_momentum=0.3, mid_activation="bn")
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 2 + 10 + 10 + 4  # stem, after and inside each separable conv, shortcuts
    assert all((m.eps, m.momentum) == (1e-5, 0.3) for m in norms)


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(TypeError, match=r"unknown Xception option\(s\) \['middle_repeat'\].*middle_repeats"):
        create_model("xception", middle_repeat=4)


def test_unknown_model_lists_available_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet50'; available models: .*xception"):
        create_model("resnet50")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mid_activation": "tanh"}, "mid_activation must be one of"),
    ({"numerics": "tf"}, "numerics must be one of"),
    ({"middle_repeats": -1}, "middle_repeats must be >= 0"),
    ({"drop_rate": 1.0}, r"drop_rate must be in \[0, 1\)"),
    ({"drop_rate": -0.1}, r"drop_rate must be in \[0, 1\)"),
    ({"order": "sideways"}, "order must be one of"),
    ({"num_classes": -1}, "num_classes must be >= 0"),
    ({"in_chans": 0}, "in_chans must be >= 1"),
    ({"entry_widths": ()}, "entry_widths needs at least one width"),
    ({"stem_widths": (32,)}, "two widths"),
    ({"tail_widths": (1536, 0)}, "tail_widths must be positive integers"),
])
def test_invalid_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model("xception", **kwargs)


# --- inputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(70, 70), (71, 70), (70, 71), (32, 300)])
def test_too_small_inputs(size) -> None:
    with pytest.raises(ValueError, match=r"at least 71x71"):
        small()(images(1, size))


def test_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match=r"expected 3 input channels, got 1.*in_chans=1"):
        small()(images(1, channels=1))
    with pytest.raises(ValueError, match="4 dimensions"):
        small()(torch.randn(3, 71, 71))


def test_one_channel_model() -> None:
    net = small(in_chans=1, num_classes=3)
    assert net.blocks.block1.conv1.weight.shape == (32, 1, 3, 3)
    assert n_params(net) == n_params(small(num_classes=3)) - 2 * 9 * 32
    with torch.no_grad():
        assert net(images(2, channels=1)).shape == (2, 3)
    with pytest.raises(ValueError, match="in_chans"):
        net(images(1))


@pytest.mark.parametrize(("size", "fmap"), [((71, 71), (3, 3)), ((240, 320), (8, 10)), ((72, 140), (3, 5))])
def test_output_sizes(size, fmap) -> None:
    # After the stem (n - 3) // 2 - 1, each downsampling module halves rounding up (TensorFlow 'same').
    side = [(n - 3) // 2 - 1 for n in size]
    for _ in range(4):
        side = [math.ceil(n / 2) for n in side]
    assert tuple(side) == fmap
    net = small(num_classes=0, global_pool="")
    with torch.no_grad():
        assert net(images(1, size)).shape == (1, 2048, *fmap)
        assert small()(images(1, size)).shape == (1, 1000)


# --- timm-style API -------------------------------------------------------------------------------


def test_forward_is_head_of_features() -> None:
    net = small()
    x = images(2)
    with torch.no_grad():
        fmap = net.forward_features(x)
        assert fmap.shape == (2, 2048, 3, 3)
        torch.testing.assert_close(net(x), net.forward_head(fmap), rtol=0, atol=0)
        pre = net.forward_head(fmap, pre_logits=True)
        assert pre.shape == (2, net.num_features) == (2, 2048)
        classifier = net.get_classifier()
        assert isinstance(classifier, nn.Linear) and classifier is net.head.predictions
        assert (classifier.in_features, classifier.out_features) == (2048, 1000)
        torch.testing.assert_close(net(x), pre @ classifier.weight.T + classifier.bias)


def test_reset_classifier() -> None:
    net = small()
    before = copy.deepcopy(net.state_dict())
    net.reset_classifier(10)
    assert net.num_classes == 10 and net.get_classifier().out_features == 10
    after = net.state_dict()
    assert set(before) == set(after)
    for key, value in before.items():
        if not key.startswith("head.predictions."):
            assert torch.equal(after[key], value), key
    x = images(2)
    with torch.no_grad():
        assert net.eval()(x).shape == (2, 10)
        net.reset_classifier(0)
        assert isinstance(net.get_classifier(), nn.Identity)
        features = net(x)
        assert features.shape == (2, 2048)
        torch.testing.assert_close(features, net.forward_features(x).mean((2, 3)))
        net.reset_classifier(0, global_pool="")
        assert net(x).shape == (2, 2048, 3, 3)
    with pytest.raises(ValueError, match="num_classes=0"):
        net.reset_classifier(5)


def test_list_models() -> None:
    assert "xception" in xception.list_models()
    assert create_model("xception").model_name == "xception"


# --- Keras names, in-place safety, TorchScript ----------------------------------------------------


def test_module_names_follow_keras(model) -> None:
    names = dict(model.named_modules())
    for name in ("blocks.block1.conv1", "blocks.block1.conv2_bn", "blocks.block2.layers.sepconv1",
                 "blocks.block2.layers.sepconv2_bn", "blocks.block4.layers.pool", "blocks.block5.layers.sepconv3",
                 "blocks.block12.layers.sepconv3_bn", "blocks.block13.layers.sepconv2",
                 "blocks.block14.layers.sepconv1", "blocks.block14.layers.sepconv2_bn", "head.predictions"):
        assert name in names, name
    assert "blocks.block2.layers.sepconv1_act" not in names  # block2's input is already activated
    assert "blocks.block15" not in names and "blocks.block5.layers.pool" not in names
    shortcuts = sorted(name for name, m in names.items() if name.endswith("shortcut.conv"))
    assert shortcuts == [f"blocks.block{i}.shortcut.conv" for i in (13, 2, 3, 4)]
    assert all(names[name].stride == (2, 2) and names[name].kernel_size == (1, 1) for name in shortcuts)
    assert isinstance(names["blocks.block14.layers.sepconv2"], SeparableConv2d)


@pytest.mark.parametrize(("block", "channels", "size"), [("block3", 128, 18), ("block5", 728, 5)])
def test_block_input_is_not_modified(model, block: str, channels: int, size: int) -> None:
    module = getattr(model.blocks, block)
    assert module.layers.sepconv1_act.inplace is False
    x = torch.randn(1, channels, size, size)
    original = x.clone()
    with torch.no_grad():
        out = module(x)
        assert torch.equal(x, original)
        shortcut = module.shortcut(original) if module.shortcut is not None else original
        torch.testing.assert_close(out, module.layers(original.clone()) + shortcut)
        # The check has teeth: an in-place first ReLU would clobber the input the shortcut needs.
        broken = copy.deepcopy(module)
        broken.layers.sepconv1_act.inplace = True
        broken(x)
        assert not torch.equal(x, original)


def test_torchscript_matches_eager(model) -> None:
    scripted = torch.jit.script(model)
    x = images(2, (71, 71))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(scripted.forward_features(x), model.forward_features(x), rtol=0, atol=0)
    with pytest.raises(torch.jit.Error, match="at least 71x71"):
        scripted(images(1, (70, 71)))
