"""DeepLabV3+ and DeepLabV3 on the family's backbones: output sizes, the paper's structure, the decoder's skip
connection, backbone weights, rebuilding from ``architecture()``, and clear errors.

Forward passes run on the compact configuration (the ``compact`` recipe's backbone) at small sizes; the big
models are only built on the meta device, for their parameter counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import xception
from xception.errors import InvalidArgumentError, WeightFileError
from xception.models.deeplab import ASPP, Decoder, DeepLab, atrous_rates_for
from xception.weights import read_safetensors_metadata

# The compact recipe's backbone (src/xception/training/recipes.py), its BatchNorm momentum aside.
COMPACT = {"stem_stride": 1, "stem_padding": "same", "stem_widths": (16, 32), "entry_widths": (48, 96),
           "middle_repeats": 1, "exit_widths": (96, 192), "tail_widths": (192, 384)}
# Narrower still, with the paper's stem (stride 2): feature maps at strides 2, 4, 8, 16, 32 as in the paper.
STRIDED = {"stem_widths": (8, 16), "entry_widths": (16, 24, 32), "middle_repeats": 1, "exit_widths": (32, 48),
           "tail_widths": (48, 64), "stem_padding": "same"}
SMALL_HEAD = {"aspp_channels": 32, "decoder_channels": 32, "low_level_channels": 8}


@pytest.fixture(autouse=True)
def single_thread(one_thread) -> None:
    """These small models run ten times faster on one thread than on two threads of a busy machine."""


def small(name: str, **options) -> DeepLab:
    head = SMALL_HEAD if name.startswith("deeplabv3plus") else {"aspp_channels": 32}
    torch.manual_seed(0)
    return xception.create_model(name, **{"num_classes": 5, **STRIDED, **head, **options}).eval()


@pytest.mark.parametrize("head", ["deeplabv3plus", "deeplabv3"])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_output_size_equals_input_size(head: str, output_stride: int) -> None:
    model = small(f"{head}_xception", output_stride=output_stride)
    assert model.backbone.feature_info[-1]["reduction"] == output_stride
    with torch.no_grad():
        for height, width in ((65, 65), (65, 97), (97, 67)):
            assert model(torch.randn(2, 3, height, width)).shape == (2, 5, height, width)


def test_output_size_gives_the_logits_on_another_grid() -> None:
    """``output_size`` (a loss on labels sampled at a stride): the same logits resized to that size instead of the
    input's; the input's own size gives the default answer exactly."""
    model = small("deeplabv3plus_xception", input_scale=0.5)
    x = torch.randn(2, 3, 130, 194)
    with torch.no_grad():
        assert torch.equal(model(x, output_size=(130, 194)), model(x))
        assert model(x, output_size=(65, 97)).shape == (2, 5, 65, 97)
        smaller = small("deeplabv3_xception")
        assert smaller(x, output_size=(33, 49)).shape == (2, 5, 33, 49)


def test_input_scale_runs_the_network_on_2x2_means_and_answers_at_full_size() -> None:
    """At input_scale 0.5 the network sees only the mean of each 2x2 block: an image whose blocks are replaced by
    their means gives the same logits. The logits still come back at the input's size, odd sizes included."""
    model = small("deeplabv3plus_xception", input_scale=0.5)
    full = small("deeplabv3plus_xception")
    assert model.min_input_size == 2 * full.min_input_size
    x = torch.randn(1, 3, 130, 194)
    block_means = nn.functional.interpolate(nn.functional.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
    with torch.no_grad():
        assert not torch.equal(x, block_means)
        torch.testing.assert_close(model(block_means), model(x), rtol=1e-4, atol=1e-5)
        assert model(torch.randn(2, 3, 131, 197)).shape == (2, 5, 131, 197)
        # The same weights at full scale answer differently: the option is not a no-op.
        full.load_state_dict(model.state_dict())
        assert not torch.allclose(full(x), model(x), atol=1e-3)
    with pytest.raises(InvalidArgumentError, match=f"at least {model.min_input_size}x.*0.5 of the input"):
        model(torch.randn(1, 3, full.min_input_size, 200))
    rebuilt = xception.create_model(model.model_name, **model.architecture())
    assert rebuilt.input_scale == 0.5


def test_compact_configuration_output_size() -> None:
    model = xception.create_model("deeplabv3plus_xception", num_classes=11, **COMPACT, **SMALL_HEAD).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 45, 61)).shape == (1, 11, 45, 61)


def test_aligned_backbone_output_size() -> None:
    model = xception.create_model("deeplabv3plus_xception41", num_classes=3, **SMALL_HEAD).eval()
    assert model.output_stride == 16 and model.aspp.rates == (6, 12, 18)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 33, 47)).shape == (1, 3, 33, 47)


def test_atrous_rates_follow_the_output_stride() -> None:
    assert atrous_rates_for(16) == (6, 12, 18)  # the paper's
    assert atrous_rates_for(8) == (12, 24, 36)  # doubled, as in the paper
    assert atrous_rates_for(32) == (3, 6, 9)
    for output_stride, rates in ((8, (12, 24, 36)), (16, (6, 12, 18)), (32, (3, 6, 9))):
        model = small("deeplabv3plus_xception", output_stride=output_stride)
        assert model.aspp.rates == rates
        dilations = [branch.conv.depthwise.dilation for branch in model.aspp.atrous]
        assert dilations == [(rate, rate) for rate in rates]
    assert small("deeplabv3plus_xception", atrous_rates=(2, 4)).aspp.rates == (2, 4)


def test_paper_structure_and_parameter_count() -> None:
    """Every layer of the head as the paper describes it, counted in closed form for Xception-65."""
    model = xception.create_model("deeplabv3plus_xception65", num_classes=21, device="meta")
    assert isinstance(model.aspp, ASPP) and isinstance(model.decoder, Decoder)
    assert model.output_stride == 16 and model.aspp.rates == (6, 12, 18) and model.aspp.dropout.p == 0.1
    low = model.backbone.feature_info[model.low_level_index]
    assert low["reduction"] == 4 and low["num_chs"] == 128

    def bn(c: int) -> int:
        return 2 * c

    def separable(c_in: int, c_out: int) -> int:  # depthwise 3x3 + BN + pointwise + BN
        return 9 * c_in + bn(c_in) + c_in * c_out + bn(c_out)

    c, a = 2048, 256
    aspp = (c * a + bn(a)) + 3 * separable(c, a) + (c * a + bn(a)) + (5 * a * a + bn(a))
    decoder = (128 * 48 + bn(48)) + separable(a + 48, 256) + separable(256, 256)
    classifier = 256 * 21 + 21
    backbone = 39_916_312 - (2048 * 1000 + 1000)  # README's count without the 1000-class classifier
    count = sum(p.numel() for p in model.parameters())
    assert count == backbone + aspp + decoder + classifier

    v3 = xception.create_model("deeplabv3_xception65", num_classes=21, device="meta")
    assert v3.decoder is None and sum(p.numel() for p in v3.parameters()) == backbone + aspp + 256 * 21 + 21


def test_regular_convolutions_without_separable() -> None:
    model = small("deeplabv3plus_xception", separable=False)
    conv = model.aspp.atrous[0].conv
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.groups == 1
    with torch.no_grad():
        assert model(torch.randn(1, 3, 66, 70)).shape == (1, 5, 66, 70)


def test_decoder_uses_the_stride_4_features(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepLabV3+ asks the backbone for its stride-4 map, and its logits change when only that map changes;
    DeepLabV3 never asks for it."""
    model = small("deeplabv3plus_xception")
    x = torch.randn(1, 3, 80, 72)
    original = model.backbone.forward_intermediates
    requested, shift = [], {"value": 0.0}

    def forward_intermediates(images, indices, **kwargs):
        requested.append(list(indices))
        final, maps = original(images, indices, **kwargs)
        return final, [feature + shift["value"] for feature in maps]

    monkeypatch.setattr(model.backbone, "forward_intermediates", forward_intermediates)
    with torch.no_grad():
        before = model(x)
        assert torch.equal(model(x), before)
        shift["value"] = 0.5
        after = model(x)
    assert requested == [[model.low_level_index]] * 3
    info = model.backbone.feature_info[model.low_level_index]
    assert info["reduction"] == 4 and info["num_chs"] == model.decoder.low_level.conv.in_channels
    assert not torch.allclose(after, before)

    v3 = small("deeplabv3_xception")

    def refuse(*args, **kwargs):
        raise AssertionError("DeepLabV3 has no decoder and needs no intermediate map")

    monkeypatch.setattr(v3.backbone, "forward_intermediates", refuse)
    with torch.no_grad():
        assert v3(x).shape == (1, 5, 80, 72)
    assert v3.decoder is None and not any("decoder" in name for name, _ in v3.named_parameters())


def test_rebuild_from_architecture(tmp_path: Path) -> None:
    model = small("deeplabv3plus_xception", output_stride=8, multi_grid=(1, 2), drop_rate=0.2)
    architecture = json.loads(json.dumps(model.architecture()))  # as stored in a checkpoint
    rebuilt = xception.create_model(model.model_name, **architecture)
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    assert all(a.shape == b.shape for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values(),
                                                  strict=True))
    assert json.loads(json.dumps(rebuilt.architecture())) == architecture and rebuilt.aspp.rates == (12, 24, 36)

    path = xception.save_weights(model, tmp_path / "seg.safetensors")
    metadata = read_safetensors_metadata(path)
    loaded = xception.create_model(metadata["model"], weights=path, **json.loads(metadata["architecture"])).eval()
    x = torch.randn(1, 3, 68, 75)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.pretrained_weights is None


def test_backbone_weights_from_a_classification_file(tmp_path: Path) -> None:
    """Our own safetensors of a classification network (with its classifier) loads into the backbone; the
    classifier is dropped and the head keeps its initialisation."""
    torch.manual_seed(1)
    classifier = xception.create_model("xception", num_classes=7, **STRIDED)
    path = xception.save_weights(classifier, tmp_path / "classifier.safetensors")
    torch.manual_seed(2)
    fresh = xception.create_model("deeplabv3plus_xception", num_classes=5, **STRIDED)
    torch.manual_seed(2)
    model = xception.create_model("deeplabv3plus_xception", num_classes=5, backbone_weights=path, **STRIDED)
    source = classifier.state_dict()
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, source[name]), name
    assert not any(name.startswith("head.predictions") for name in model.backbone.state_dict())
    head = {name: t for name, t in model.state_dict().items() if not name.startswith("backbone.")}
    fresh_head = {name: t for name, t in fresh.state_dict().items() if not name.startswith("backbone.")}
    assert all(torch.equal(head[name], fresh_head[name]) for name in head)  # the same seed: the same new head
    assert not torch.equal(fresh.backbone.blocks.block1.conv1.weight, model.backbone.blocks.block1.conv1.weight)


def test_registered_backbone_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """backbone_weights='imagenet' fetches the registered file without classifier (Keras's no-top file, which
    nothing here may download). fetch is the network boundary: it returns our safetensors of the same network
    without its classifier, which the loader reads by content just as it reads the Keras file (the format tests in
    tests/weights cover that file's own layout). The first convolution is adapted to one input channel."""
    from xception.weights import loading

    registered = xception.get_weights("xception", "imagenet")
    torch.manual_seed(3)
    features = xception.create_model("xception", num_classes=0)
    path = xception.save_weights(features, tmp_path / "notop.safetensors")
    fetched = []

    def fetch(file: object, **_kwargs: object) -> Path:
        fetched.append(file)
        return path

    monkeypatch.setattr(loading, "fetch", fetch)
    model = xception.create_model("deeplabv3_xception", num_classes=3, in_chans=1, backbone_weights="imagenet",
                                  aspp_channels=8)
    assert fetched == [registered.notop_file]
    assert model.backbone.pretrained_weights is registered and model.pretrained_weights is None
    source = features.state_dict()
    for name, tensor in model.backbone.state_dict().items():
        if name == "blocks.block1.conv1.weight":  # RGB filters summed for one channel
            assert torch.allclose(tensor, source[name].sum(dim=1, keepdim=True))
        else:
            assert torch.equal(tensor, source[name]), name


def test_backbone_weights_that_do_not_fit(tmp_path: Path) -> None:
    other = xception.create_model("xception", num_classes=7, **COMPACT)
    path = xception.save_weights(other, tmp_path / "compact.safetensors")
    with pytest.raises(WeightFileError, match="does not fit"):
        xception.create_model("deeplabv3plus_xception", backbone_weights=path, **STRIDED)


def test_registry() -> None:
    segmentation = xception.list_models("segmentation")
    backbones = xception.list_models("classification")
    assert sorted(segmentation) == sorted(f"{h}_{b}" for h in ("deeplabv3plus", "deeplabv3") for b in backbones)
    assert sorted(xception.list_models()) == sorted(segmentation + backbones)
    with pytest.raises(InvalidArgumentError, match="task must be one of"):
        xception.list_models("detection")


def test_defaults_are_the_papers() -> None:
    model = xception.create_model("deeplabv3plus_xception65", device="meta")
    assert (model.num_classes, model.output_stride, model.aspp.dropout.p) == (21, 16, 0.1)
    assert model.aspp.out_channels == 256 and model.decoder.out_channels == 256
    assert model.decoder.low_level.conv.out_channels == 48
    assert model.min_input_size == model.backbone.min_input_size and model.in_chans == 3
    assert model.task == "segmentation" and model.pretrained_weights is None


def test_clear_errors() -> None:
    model = small("deeplabv3plus_xception")
    with pytest.raises(InvalidArgumentError, match="expected 3 input channels, got 1"):
        model(torch.randn(1, 1, 80, 80))
    with pytest.raises(InvalidArgumentError, match="too small"):
        model(torch.randn(1, 3, model.min_input_size - 1, 80))
    with pytest.raises(InvalidArgumentError, match=r"no registered weights.*backbone_weights='imagenet'"):
        xception.create_model("deeplabv3plus_xception", weights="imagenet")
    with pytest.raises(InvalidArgumentError, match="segmentation model: global_pool, features_only"):
        xception.create_model("deeplabv3plus_xception", features_only=True)
    with pytest.raises(InvalidArgumentError, match="num_classes must be an integer >= 1"):
        xception.create_model("deeplabv3plus_xception", num_classes=0, device="meta")
    with pytest.raises(InvalidArgumentError, match="has no decoder"):
        xception.create_model("deeplabv3_xception", decoder_channels=64, device="meta")
    with pytest.raises(InvalidArgumentError, match="atrous_rates must be positive integers"):
        xception.create_model("deeplabv3plus_xception", atrous_rates=(0, 6), device="meta")
    # A backbone whose only stride-4 map is its last: the decoder would have no finer features to add.
    with pytest.raises(InvalidArgumentError, match="needs a stride-4 feature map before the last one"):
        xception.create_model("deeplabv3plus_xception", stem_stride=1, entry_widths=(16,), middle_repeats=0,
                              device="meta", **{k: v for k, v in COMPACT.items()
                                                if k not in ("stem_stride", "entry_widths", "middle_repeats")})
    with pytest.raises(TypeError, match="unknown Xception option"):
        xception.create_model("deeplabv3plus_xception", middle_flow=3, device="meta")


def test_a_training_step_reaches_every_parameter() -> None:
    model = small("deeplabv3plus_xception").train()
    x, labels = torch.randn(2, 3, 65, 70), torch.randint(5, (2, 65, 70))
    labels[:, :10] = 255  # ignored pixels, as the segmentation data marks them
    torch.nn.functional.cross_entropy(model(x), labels, ignore_index=255).backward()
    unreached = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not unreached
    with pytest.raises(InvalidArgumentError, match="batches of two or more images"):
        model(x[:1])


def test_reset_classifier() -> None:
    model = small("deeplabv3plus_xception")
    model.reset_classifier(2)
    assert model.num_classes == 2 and model.get_classifier().out_channels == 2
    assert model.architecture()["num_classes"] == 2
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 65)).shape == (1, 2, 65, 65)
