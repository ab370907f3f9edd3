"""timm and segmentation_models.pytorch interop, with the real libraries: ``xception_keras`` in timm's registry
(features, output stride, the official weights through our loader), smp's ``tu-`` encoder, and ``local-dir:``
folders that timm loads with our outputs."""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from conftest import relative_error
from http_server import closed_port_url
from keras_reference import random_keras_h5
from PIL import Image
from torch import nn

import xception
from xception.errors import InvalidArgumentError
from xception.timm_interop import TimmXception, register, save_timm_folder
from xception.weights import download as hub
from xception.weights import registered as weights_module
from xception.weights.formats import read_weights

TOLERANCE = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # small inputs: extra threads only slow a shared CPU


def images(size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def randomize_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and statistics: with the defaults (0, 1) a comparison would miss any BN that
    was skipped or given the wrong tensor."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            shape = bn.num_features
            bn.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
            bn.bias.copy_(torch.randn(shape, generator=generator) * 0.2)
            bn.running_mean.copy_(torch.randn(shape, generator=generator) * 0.2)
            bn.running_var.copy_(torch.rand(shape, generator=generator) * 1.5 + 0.5)
    return model.eval()


@torch.no_grad()
def calibrate(model: nn.Module, size: int) -> nn.Module:
    """Random BN scales and shifts with statistics measured on a batch, then perturbed (as conftest's
    calibrate_batch_norm, for any input channels): with statistics that do not fit the activations a deep network's
    output hardly depends on its input, and comparing outputs would prove little."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    randomize_batch_norm(model)
    for bn in norms:
        bn.momentum = None  # cumulative average: one pass gives exactly the batch statistics
    model.train()(images(size, model.in_chans, seed=1))
    for bn in norms:
        bn.momentum = 0.1
        bn.running_mean += 0.1 * bn.running_var.sqrt() * torch.randn_like(bn.running_mean)
        bn.running_var *= torch.empty_like(bn.running_var).uniform_(0.7, 1.4)
    return model.eval()


# --- xception_keras in timm's registry -------------------------------------------------------------------


def test_register_is_idempotent_and_lists_the_weights() -> None:
    entrypoint = timm.models.model_entrypoint("xception_keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns when a name is registered over
        register()
        register()
    assert timm.models.model_entrypoint("xception_keras") is entrypoint
    assert "xception_keras.tf_in1k" in timm.list_models("xception_keras*", pretrained=True)
    # smp reads the preprocessing of tu- encoders from timm's pretrained config
    params = smp.encoders.get_preprocessing_params("tu-xception_keras")
    assert list(params["mean"]) == list(params["std"]) == [0.5, 0.5, 0.5]


def test_timm_model_is_the_paper_network() -> None:
    model = timm.create_model("xception_keras")
    assert isinstance(model, TimmXception)
    assert sum(p.numel() for p in model.parameters()) == 22_855_952
    ours = randomize_batch_norm(xception.create_model("xception"))
    assert list(model.state_dict()) == list(ours.state_dict())
    model.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(images(80)), ours(images(80)))
    assert model.blocks.block1.conv1_bn.eps == 1e-3  # Keras numerics, not legacy_xception's 1e-5


def test_timm_preprocessing_is_the_weights_own() -> None:
    """timm's evaluation transform from the registered config reproduces the weights' transforms() exactly."""
    model = timm.create_model("xception_keras")
    config = timm.data.resolve_data_config({}, model=model)
    timm_transform = timm.data.create_transform(**config)
    pixels = np.random.default_rng(0).integers(0, 256, (360, 420, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    expected = xception.get_weights("xception", "imagenet").transforms()(image)
    assert torch.equal(timm_transform(image), expected)


def test_other_numerics_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="legacy_xception"):
        timm.create_model("xception_keras", numerics="timm")
    with pytest.raises(xception.XceptionError, match="unknown xception_keras option"):
        timm.create_model("xception_keras", middle_repeat=2)


@pytest.mark.parametrize(("output_stride", "out_indices", "options"), [
    (32, None, {}),
    (16, (1, 2, 4), {}),
    (8, (0, 3, 4), {}),
    (16, None, {"stem_padding": "valid"}),  # Keras's exact graph, asked for
])
def test_timm_features_equal_ours(output_stride: int, out_indices, options: dict) -> None:
    kwargs = {"output_stride": output_stride, **({"out_indices": out_indices} if out_indices else {})}
    features = timm.create_model("xception_keras", features_only=True, **kwargs, **options).eval()
    # A feature model pads the stem 'same' unless told otherwise: the same weights, maps of ceil(H / stride).
    ours = xception.create_model("xception", features_only=True, **kwargs,
                                 **{"stem_padding": "same", **options}).eval()
    randomize_batch_norm(features)
    ours.load_state_dict({name.removeprefix("model."): t for name, t in features.state_dict().items()})
    reductions = [2, 4, 8, 16, 32] if output_stride == 32 else [min(r, output_stride) for r in [2, 4, 8, 16, 32]]
    wanted = list(out_indices or range(5))
    assert features.feature_info.reduction() == [reductions[i] for i in wanted]
    assert features.feature_info.channels() == [info["num_chs"] for info in ours.feature_info]
    with torch.no_grad():
        theirs, mine = features(images(96)), ours(images(96))
    assert len(theirs) == len(mine) == len(wanted)
    for map_theirs, map_mine in zip(theirs, mine, strict=True):
        assert torch.equal(map_theirs, map_mine)
    if "stem_padding" not in options:
        assert [m.shape[-1] for m in theirs] == [-(-96 // reductions[i]) for i in wanted]


def test_smp_deeplabv3plus_with_the_tu_encoder() -> None:
    """The issue's acceptance check: smp's tu- encoder builds timm's features_only model by name."""
    model = smp.DeepLabV3Plus(encoder_name="tu-xception_keras", encoder_weights=None, encoder_output_stride=16,
                              classes=12).eval()
    assert model.encoder.out_channels == [3, 64, 128, 256, 728, 2048]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 256, 256)).shape == (2, 12, 256, 256)


# --- pretrained=True: the official files through our loader, from a local cache ----------------------------


@pytest.fixture(scope="module")
def official_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random weights in the layout of the official 2016 files, written by Keras's own writer
    (keras_reference.save_official_layout, whose docstring gives the evidence for the layout)."""
    folder = tmp_path_factory.mktemp("official")
    registered = xception.get_weights("xception", "imagenet")
    return {"top": random_keras_h5(folder / registered.file.filename, include_top=True, seed=5),
            "notop": random_keras_h5(folder / registered.notop_file.filename, include_top=False, seed=6)}


@pytest.fixture
def cached_official_files(official_files, torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The files in a private download cache, the registry pinned to their checksums, every URL a closed port: the
    loader must verify and use the cached copies, and fails if it tries the network."""
    torch_home.mkdir(parents=True)
    for path in official_files.values():
        shutil.copyfile(path, torch_home / path.name)
    registered = xception.get_weights("xception", "imagenet")
    with closed_port_url("unreachable") as url:

        def local(file: hub.WeightFile) -> hub.WeightFile:
            md5, sha256 = hub.digests(torch_home / file.filename)
            return dataclasses.replace(file, urls=(url,), md5=md5, sha256_prefix=sha256,
                                       num_bytes=(torch_home / file.filename).stat().st_size)

        patched = dataclasses.replace(registered, file=local(registered.file),
                                      notop_file=local(registered.notop_file))
        monkeypatch.setitem(weights_module._REGISTRY, ("xception", "imagenet"), patched)
        yield official_files


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_pretrained_loads_the_official_weights(cached_official_files) -> None:
    top, notop = cached_official_files["top"], cached_official_files["notop"]
    model = timm.create_model("xception_keras", pretrained=True)
    assert_same_state(model.state_dict(), xception.create_model("xception", weights=top).state_dict())
    assert model.pretrained_weights is xception.get_weights("xception", "imagenet")

    backbone = xception.create_model("xception", num_classes=0, weights=notop).state_dict()
    features = timm.create_model("xception_keras", pretrained=True, features_only=True, out_indices=(3, 4))
    for name, tensor in features.state_dict().items():
        assert torch.equal(tensor, backbone[name.removeprefix("model.")]), name
    finetune = timm.create_model("xception_keras", pretrained=True, num_classes=10, in_chans=1)
    state = finetune.state_dict()
    assert state["head.predictions.weight"].shape == (10, 2048)
    assert torch.allclose(state["blocks.block1.conv1.weight"], backbone["blocks.block1.conv1.weight"].sum(1, True))
    assert torch.equal(state["blocks.block14.layers.sepconv2_bn.running_var"],
                       backbone["blocks.block14.layers.sepconv2_bn.running_var"])


def test_pretrained_file_in_timm_config_goes_through_our_reader(official_files) -> None:
    """timm's own way to name a weight file: a file that is not a PyTorch state dict (custom_load=True, as timm asks
    for such files) reaches TimmXception.load_pretrained, which reads the Keras file."""
    top = official_files["top"]
    model = timm.create_model("xception_keras", pretrained=True,
                              pretrained_cfg_overlay={"file": str(top), "custom_load": True})
    assert_same_state(model.state_dict(), xception.create_model("xception", weights=top).state_dict())


# --- local-dir: folders ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options", "size"), [
    ("xception41", {"output_stride": 16, "num_classes": 10}, 64),
    ("xception65", {}, 64),
    ("xception71", {}, 64),
    ("xception41p", {"in_chans": 1}, 64),
    ("xception65p", {}, 64),
    ("xception", {"numerics": "timm", "num_classes": 5}, 80),  # timm's legacy_xception
])
def test_local_dir_round_trip(name: str, options: dict, size: int, tmp_path: Path) -> None:
    model = xception.create_model(name, **options)
    calibrate(model, size)
    folder = save_timm_folder(model, tmp_path / "folder")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert type(loaded).__module__.startswith("timm.")
    x = images(size, model.in_chans)
    with torch.no_grad():
        expected, actual = model(x), loaded(x)
    assert actual.shape == expected.shape == (2, model.num_classes)
    assert relative_error(actual, expected) <= TOLERANCE
    assert relative_error(expected[0], expected[1]) > 100 * TOLERANCE  # the outputs depend on the input
    # The file, read back by our reader of timm's files, holds exactly the model's state.
    _, back = read_weights(folder / "model.safetensors", model)
    assert_same_state({name: back[name] for name in model.state_dict()}, model.state_dict())
    assert len(back) == len(model.state_dict())


def test_xception_keras_folder_any_configuration(tmp_path: Path) -> None:
    model = randomize_batch_norm(xception.create_model("xception", middle_repeats=1, segments=4, num_classes=3))
    folder = save_timm_folder(model, tmp_path / "keras", architecture="xception_keras")
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert isinstance(loaded, TimmXception) and loaded.config == model.config
    assert_same_state(loaded.state_dict(), model.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(images(80)), model(images(80)))


@pytest.mark.parametrize(("build", "needles"), [
    (lambda: xception.create_model("xception", device="meta"), ["numerics='timm'", "xception_keras"]),
    (lambda: xception.create_model("xception", numerics="timm", middle_repeats=4, device="meta"), ["other knobs"]),
    (lambda: xception.create_model("xception", numerics="timm", output_stride=16, device="meta"), ["output_stride"]),
    (lambda: xception.create_model("xception65", multi_grid=(1, 2, 4), device="meta"), ["multi_grid"]),
    (lambda: xception.create_model("xception65", features_only=True, device="meta"), ["whole model"]),
    (lambda: xception.create_model("inception_v3_compact", device="meta"), ["no architecture"]),
    (lambda: nn.Linear(2, 2), ["no architecture for Linear"]),
])
def test_what_timm_has_no_architecture_for_is_refused(build, needles: list[str], tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        save_timm_folder(build(), tmp_path / "refused")
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    assert not (tmp_path / "refused").exists()
