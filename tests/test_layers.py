"""The building blocks: TensorFlow-exact 'same' padding (checked against Keras itself on the PyTorch backend),
depthwise separable convolutions and the Inception spectrum between regular and separable convolutions."""

from __future__ import annotations

import itertools
import math
from functools import partial

import keras
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error
from torch import nn

from xception import Conv2dSame, MaxPool2dSame, SeparableConv2d, SpectrumConv2d, tf_same_padding

SIZES = [(7, 7), (8, 8), (9, 9), (10, 10), (15, 16), (16, 15), (8, 11), (3, 3), (2, 5)]


def tf_docs_padding(n: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TensorFlow's documented rule for padding='same', written with floats."""
    out = math.ceil(n / s)
    total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
    return total // 2, total - total // 2


def to_numpy(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def nhwc(h: int, w: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(2, h, w, channels)).astype("float32"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """The tensors here are small (see conftest's one_thread)."""


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- tf_same_padding ------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "s", "d"), list(itertools.product([1, 2, 3, 4, 5, 7], [1, 2, 3, 4], [1, 2, 3])))
def test_tf_same_padding_matches_tensorflow_docs(k: int, s: int, d: int) -> None:
    for n in range(1, 40):
        assert tf_same_padding(n, k, s, d) == tf_docs_padding(n, k, s, d), n


@pytest.mark.parametrize(("n", "k", "s", "d", "expected"), [
    (8, 3, 2, 1, (0, 1)),  # the extra element goes after the input
    (7, 3, 2, 1, (1, 1)),
    (147, 3, 2, 1, (1, 1)),
    (10, 3, 1, 1, (1, 1)),
    (10, 4, 1, 1, (1, 2)),
    (10, 3, 1, 2, (2, 2)),
    (10, 1, 2, 1, (0, 0)),
    (9, 2, 3, 1, (0, 0)),  # the windows never reach the end: no padding at all
])
def test_tf_same_padding_known_values(n: int, k: int, s: int, d: int, expected: tuple[int, int]) -> None:
    assert tf_same_padding(n, k, s, d) == expected


# --- against Keras --------------------------------------------------------------------------------


def keras_conv_and_ours(k: int, s: int, d: int, x: torch.Tensor, filters: int = 4):
    layer = keras.layers.Conv2D(filters, k, strides=s, dilation_rate=d, padding="same", use_bias=False)
    expected = to_numpy(layer(x))
    conv = Conv2dSame(x.shape[-1], filters, k, stride=s, dilation=d, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(to_numpy(layer.kernel)).permute(3, 2, 0, 1))
        actual = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return actual, expected, conv


@pytest.mark.parametrize(("k", "s", "d"), [(1, 1, 1), (2, 1, 1), (3, 1, 1), (4, 1, 1), (5, 1, 1), (3, 1, 2),
                                           (4, 1, 2), (3, 1, 3), (1, 2, 1), (2, 2, 1), (3, 2, 1), (4, 2, 1),
                                           (5, 2, 1), (3, 3, 1), (4, 3, 1)])
def test_conv2d_same_matches_keras(k: int, s: int, d: int) -> None:
    for h, w in SIZES:
        x = nhwc(h, w)
        actual, expected, _ = keras_conv_and_ours(k, s, d, x)
        assert actual.shape == expected.shape == (2, math.ceil(h / s), math.ceil(w / s), 4), (h, w)
        assert relative_error(actual, expected) < 1e-6, (h, w)


def test_conv2d_same_stride2_is_asymmetric_and_symmetric_torch_padding_is_not_keras() -> None:
    x = nhwc(8, 10)
    actual, expected, conv = keras_conv_and_ours(3, 2, 1, x)
    assert not conv.static_padding
    assert relative_error(actual, expected) < 1e-6
    # PyTorch's symmetric padding=1 gives the same shape but different numbers at even sizes.
    symmetric = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    symmetric.weight = conv.weight
    with torch.no_grad():
        other = symmetric(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert other.shape == actual.shape
    assert relative_error(other, expected) > 0.1


@pytest.mark.parametrize(("k", "s"), [(3, 2), (2, 2), (3, 1), (2, 1), (4, 1), (1, 2), (2, 3), (5, 3), (4, 4)])
def test_max_pool2d_same_matches_keras_exactly(k: int, s: int) -> None:
    for h, w in [*SIZES, (1, 4)]:
        x = nhwc(h, w)
        expected = to_numpy(keras.layers.MaxPooling2D(k, s, padding="same")(x))
        explicit = MaxPool2dSame(k, s)
        explicit.explicit_padding = True  # the int8 deploy path's variant
        for pool in (MaxPool2dSame(k, s), explicit):
            with torch.no_grad():
                actual = pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
            assert actual.shape == expected.shape == (2, math.ceil(h / s), math.ceil(w / s), 3), (h, w)
            np.testing.assert_array_equal(actual, expected, err_msg=str((h, w)))


def test_torch_max_pool_differs_from_keras_on_even_sizes() -> None:
    x = nhwc(8, 10)
    expected = to_numpy(keras.layers.MaxPooling2D(3, 2, padding="same")(x))
    with torch.no_grad():
        ours = MaxPool2dSame(3, 2)(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        symmetric = nn.MaxPool2d(3, 2, padding=1)(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours, expected)
    assert symmetric.shape == expected.shape
    assert (symmetric != expected).mean() > 0.1
    # On odd sizes TensorFlow pads symmetrically too, and the two agree.
    x = nhwc(9, 9)
    expected = to_numpy(keras.layers.MaxPooling2D(3, 2, padding="same")(x))
    with torch.no_grad():
        symmetric = nn.MaxPool2d(3, 2, padding=1)(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(symmetric, expected)


def test_same_padding_layers_script() -> None:
    x = torch.randn(2, 3, 8, 11)
    for module in (Conv2dSame(3, 4, 3, stride=2), Conv2dSame(3, 4, 4), MaxPool2dSame(3, 2), MaxPool2dSame(2, 1)):
        scripted = torch.jit.script(module)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), module(x), rtol=0, atol=0)


# --- SeparableConv2d ------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "stride", "dilation", "expected"), [
    ((9, 9), 1, 1, (9, 9)), ((9, 8), 2, 1, (5, 4)), ((16, 15), 2, 1, (8, 8)), ((10, 10), 1, 2, (10, 10)),
    ((7, 12), 3, 1, (3, 4)),
])
@pytest.mark.parametrize("order", ["depthwise_first", "pointwise_first"])
def test_separable_output_shapes(size, stride, dilation, expected, order) -> None:
    layer = SeparableConv2d(6, 10, 3, stride=stride, dilation=dilation, order=order)
    assert layer(torch.randn(2, 6, *size)).shape == (2, 10, *expected)


@pytest.mark.parametrize(("cin", "cout", "k", "kwargs", "expected"), [
    # depthwise first: k*k*in*m + in*m*out
    (16, 32, 3, {}, 3 * 3 * 16 + 16 * 32),
    (16, 32, 5, {}, 5 * 5 * 16 + 16 * 32),
    (16, 32, 3, {"depth_multiplier": 2}, 3 * 3 * 16 * 2 + 16 * 2 * 32),
    # one segment: a regular kxk conv over the input channels, then the 1x1
    (16, 32, 3, {"segments": 1}, 3 * 3 * 16 * 16 + 16 * 32),
    (16, 32, 3, {"segments": 4}, 3 * 3 * 16 * 4 + 16 * 32),
    # pointwise first: in*out + k*k*out
    (16, 32, 3, {"order": "pointwise_first"}, 16 * 32 + 3 * 3 * 32),
    (16, 32, 3, {"order": "pointwise_first", "segments": 1}, 16 * 32 + 3 * 3 * 32 * 32),
    (16, 32, 3, {"order": "pointwise_first", "segments": 8}, 16 * 32 + 3 * 3 * 32 * 4),
    (728, 728, 3, {}, 9 * 728 + 728 * 728),
])
def test_separable_parameter_counts(cin: int, cout: int, k: int, kwargs: dict, expected: int) -> None:
    layer = SeparableConv2d(cin, cout, k, **kwargs)
    assert n_params(layer) == expected
    assert SeparableConv2d.count_parameters(cin, cout, k, **kwargs) == expected
    assert n_params(SeparableConv2d(cin, cout, k, bias=True, **kwargs)) == expected + cout
    mid_channels = cin * kwargs.get("depth_multiplier", 1) if kwargs.get("order") != "pointwise_first" else cout
    assert n_params(SeparableConv2d(cin, cout, k, mid_activation="bn", **kwargs)) == expected + 2 * mid_channels
    for mid in ("relu", "elu"):
        assert n_params(SeparableConv2d(cin, cout, k, mid_activation=mid, **kwargs)) == expected


@pytest.mark.parametrize("depth_multiplier", [1, 2])
def test_depthwise_first_is_depthwise_then_pointwise(depth_multiplier: int) -> None:
    layer = SeparableConv2d(4, 6, 3, depth_multiplier=depth_multiplier, bias=True)
    with torch.no_grad():
        layer.pointwise.bias.normal_()
    depthwise, pointwise, bias = layer.depthwise.weight, layer.pointwise.weight, layer.pointwise.bias
    assert layer.depthwise.bias is None
    assert depthwise.shape == (4 * depth_multiplier, 1, 3, 3) and pointwise.shape == (6, 4 * depth_multiplier, 1, 1)
    x = torch.randn(2, 4, 9, 8)
    with torch.no_grad():
        expected = F.conv2d(F.conv2d(F.pad(x, (1, 1, 1, 1)), depthwise, groups=4), pointwise, bias)
        torch.testing.assert_close(layer(x), expected)
        # stride 2 on the even width: TensorFlow pads 0 before and 1 after; on the odd height 1 and 1
        strided = SeparableConv2d(4, 6, 3, stride=2, depth_multiplier=depth_multiplier)
        strided.load_state_dict({"depthwise.weight": depthwise, "pointwise.weight": pointwise})
        expected = F.conv2d(F.conv2d(F.pad(x, (0, 1, 1, 1)), depthwise, stride=2, groups=4), pointwise)
        torch.testing.assert_close(strided(x), expected)


def test_pointwise_first_applies_the_1x1_first() -> None:
    layer = SeparableConv2d(6, 6, 3, order="pointwise_first", bias=True)
    with torch.no_grad():
        layer.depthwise.bias.normal_()
    pointwise, depthwise, bias = layer.pointwise.weight, layer.depthwise.weight, layer.depthwise.bias
    assert layer.pointwise.bias is None  # the bias belongs to the convolution that comes last
    assert pointwise.shape == (6, 6, 1, 1) and depthwise.shape == (6, 1, 3, 3)
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        expected = F.conv2d(F.conv2d(x, pointwise), depthwise, bias, padding=1, groups=6)
        wrong_order = F.conv2d(F.conv2d(x, depthwise, padding=1, groups=6), pointwise) + bias.view(1, -1, 1, 1)
        actual = layer(x)
    torch.testing.assert_close(actual, expected)
    assert relative_error(actual, wrong_order) > 0.05


@pytest.mark.parametrize("order", ["depthwise_first", "pointwise_first"])
@pytest.mark.parametrize(("mid", "function"), [("relu", F.relu), ("elu", F.elu)])
def test_mid_activation_runs_between_the_two_convolutions(order: str, mid: str, function) -> None:
    plain = SeparableConv2d(4, 6, 3, order=order)
    activated = SeparableConv2d(4, 6, 3, order=order, mid_activation=mid)
    activated.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        if order == "depthwise_first":
            expected = plain.pointwise(function(plain.depthwise(x)))
        else:
            expected = plain.depthwise(function(plain.pointwise(x)))
        actual = activated(x)
        torch.testing.assert_close(actual, expected)
        assert relative_error(actual, plain(x)) > 0.05


def test_mid_bn_normalizes_between_the_two_convolutions() -> None:
    # A non-default eps shows that the BN is the one norm_layer builds.
    layer = SeparableConv2d(4, 6, 3, mid_activation="bn", norm_layer=partial(nn.BatchNorm2d, eps=0.05)).eval()
    with torch.no_grad():
        layer.mid_norm.running_mean.normal_()
        layer.mid_norm.running_var.uniform_(0.5, 2)
        layer.mid_norm.weight.normal_()
        layer.mid_norm.bias.normal_()
        x = torch.randn(2, 4, 7, 7)
        mid = layer.mid_norm
        between = layer.depthwise(x)
        normalized = (between - mid.running_mean.view(1, -1, 1, 1)) / torch.sqrt(mid.running_var.view(1, -1, 1, 1)
                                                                                  + 0.05)
        expected = layer.pointwise(normalized * mid.weight.view(1, -1, 1, 1) + mid.bias.view(1, -1, 1, 1))
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"order": "depthwise_last"}, r"order must be one of .*depthwise_first.*pointwise_first.*depthwise_last"),
    ({"mid_activation": "tanh"}, r"mid_activation must be one of .*relu.*elu.*bn.*tanh"),
    ({"segments": 3}, r"segments must divide the 8 channels of the spatial convolution, got 3"),
    ({"segments": 0}, r"segments must divide .* got 0"),
    ({"order": "pointwise_first", "segments": 5}, r"segments must divide the 12 channels .* got 5"),
    ({"order": "pointwise_first", "depth_multiplier": 2}, r"depth_multiplier must be 1 when order='pointwise_first'"),
])
def test_separable_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SeparableConv2d(8, 12, 3, **kwargs)


# --- SpectrumConv2d -------------------------------------------------------------------------------


@pytest.mark.parametrize("segments", [1, 4, 16, 32])
def test_spectrum_parameter_formula(segments: int) -> None:
    cin, cout, k = 8, 32, 3
    expected = cin * cout + k * k * cout * cout // segments
    layer = SpectrumConv2d(cin, cout, k, segments=segments)
    assert n_params(layer) == expected
    assert SeparableConv2d.count_parameters(cin, cout, k, order="pointwise_first", segments=segments) == expected
    assert layer(torch.randn(1, cin, 6, 6)).shape == (1, cout, 6, 6)


def test_spectrum_one_segment_is_1x1_then_regular_conv() -> None:
    layer = SpectrumConv2d(5, 8, 3, segments=1)
    project, spatial = nn.Conv2d(5, 8, 1, bias=False), nn.Conv2d(8, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        project.weight.copy_(layer.pointwise.weight)
        spatial.weight.copy_(layer.depthwise.weight)
        x = torch.randn(2, 5, 9, 8)
        torch.testing.assert_close(layer(x), spatial(project(x)))


def test_spectrum_intermediate_segments_are_grouped_convs() -> None:
    layer = SpectrumConv2d(5, 8, 3, segments=4)
    assert layer.depthwise.weight.shape == (8, 2, 3, 3)
    x = torch.randn(2, 5, 7, 7)
    with torch.no_grad():
        expected = F.conv2d(F.conv2d(x, layer.pointwise.weight), layer.depthwise.weight, padding=1, groups=4)
        torch.testing.assert_close(layer(x), expected)


def test_spectrum_one_segment_per_channel_is_pointwise_first_separable() -> None:
    layer = SpectrumConv2d(5, 8, 3, segments=8, mid_activation="relu")
    separable = SeparableConv2d(5, 8, 3, order="pointwise_first", mid_activation="relu")
    separable.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 9, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), separable(x), rtol=0, atol=0)
        expected = F.conv2d(F.relu(F.conv2d(x, layer.pointwise.weight)), layer.depthwise.weight, padding=1, groups=8)
        torch.testing.assert_close(layer(x), expected)


def test_spectrum_requires_segments() -> None:
    with pytest.raises(TypeError, match="segments"):
        SpectrumConv2d(5, 8, 3)  # type: ignore[call-arg]
