"""The aligned Xception family (xception41/65/71, pre-activation 41p/65p) against timm's ``xception_aligned``.

Parity follows test_timm_parity.py: the reference has random weights and BatchNorm statistics calibrated on a real
batch, then perturbed, so that its logits really depend on the input (checked: two images differ by far more than
the tolerance). The weights go through files, as users get them: a ``.pth`` state dict and a ``.safetensors`` file
(timm's hub format).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from conftest import calibrate_batch_norm, relative_error
from http_server import serve_directory, serve_hub
from safetensors.torch import save_file
from torch import nn

import xception
from xception.weights import download as hub
from xception.weights import loading as weights_loading
from xception.weights import registered as weights_module
from xception.weights.download import WeightsUnavailableError

TOLERANCE = 1e-5
ALIGNED = ["xception41", "xception65", "xception71", "xception41p", "xception65p"]
ALL_MODELS = ["xception", "xception41", "xception41p", "xception65", "xception65p", "xception71"]
PARAMETERS = {
    "xception41": 26_969_560,
    "xception65": 39_916_312,
    "xception71": 42_338_736,
    "xception41p": 26_907_752,
    "xception65p": 39_819_560,
}
SIZE_299, SIZE_WIDE = (299, 299), (256, 320)
OS_SIZE = (64, 96)  # enough for the output-stride checks: the deepest maps are 4x6 at 16 and 8x12 at 8
TIMM_RELEASES = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"


def calibrated_timm(name: str, seed: int, **options) -> nn.Module:
    """timm's model with random weights and BN statistics calibrated on a batch, then perturbed."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **options)
    return calibrate_batch_norm(model, 160, model.head.fc)


def images(size: tuple[int, int], batch: int = 2, seed: int = 0, channels: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, *size, generator=generator) * 2 - 1


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert current.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(current[name], tensor), name


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# --- architecture ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALIGNED)
def test_parameter_count_is_timms(name: str) -> None:
    ours = sum(p.numel() for p in xception.create_model(name).parameters())
    theirs = sum(p.numel() for p in timm.create_model(name).parameters())
    assert ours == PARAMETERS[name] == theirs


# --- parity with timm, through weight files -------------------------------------------------------------

@dataclass
class Reference:
    name: str
    state: dict[str, torch.Tensor]
    files: dict[str, Path]  # "pth" and "safetensors"
    expected: dict[tuple[int, int], torch.Tensor]  # timm's eval logits per input size


@pytest.fixture(scope="module", params=ALIGNED)
def reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    name = request.param
    model = calibrated_timm(name, seed=ALIGNED.index(name))
    # 299x299 (one image) only for the 41s, to save time; 256x320 (two images) for every model.
    inputs = {SIZE_WIDE: images(SIZE_WIDE)}
    if name in ("xception41", "xception41p"):
        inputs[SIZE_299] = images(SIZE_299, batch=1, seed=1)
    with torch.no_grad():
        expected = {size: model(x) for size, x in inputs.items()}
    state = snapshot(model)
    folder = tmp_path_factory.mktemp(name)
    files = {"pth": folder / f"{name}.pth", "safetensors": folder / f"{name}.safetensors"}
    torch.save(state, files["pth"])
    save_file(state, str(files["safetensors"]))
    return Reference(name, state, files, expected)


def test_reference_output_depends_on_input(reference: Reference) -> None:
    """The parity checks have teeth: a tolerance met by two different images would prove nothing."""
    wide = reference.expected[SIZE_WIDE]
    assert wide.shape == (2, 1000)
    assert relative_error(wide[0], wide[1]) > 100 * TOLERANCE


@pytest.mark.parametrize("container", ["pth", "safetensors"])
def test_weight_file_matches_timm(reference: Reference, container: str) -> None:
    path = reference.files[container]
    model = xception.create_model(reference.name, weights=path)
    for size, expected in reference.expected.items():
        actual = logits(model, images(size, batch=expected.shape[0], seed=0 if size == SIZE_WIDE else 1))
        assert actual.shape == expected.shape
        assert relative_error(actual, expected) <= TOLERANCE, size


@pytest.mark.parametrize("output_stride", [16, 8])
def test_output_stride_matches_timm(reference: Reference, output_stride: int) -> None:
    x = images(OS_SIZE, seed=2)
    ours = xception.create_model(reference.name, output_stride=output_stride, weights=reference.files["pth"])
    actual = logits(ours, x)
    assert actual.shape == (2, 1000)
    assert torch.isfinite(actual).all()
    theirs = timm.create_model(reference.name, output_stride=output_stride)
    if reference.name == "xception71" and output_stride == 8:
        # timm cannot load xception71's weights at output stride 8: it turns the stride of blocks.4 (728 -> 728
        # channels, stride 2) into dilation before building the block, so the block thinks it needs no 1x1
        # shortcut and drops blocks.4.shortcut (the BN of which the file has). Ours keeps the shortcut (stride 1),
        # as DeepLab does, so it loads the same file; only check that it loads and runs.
        missing, unexpected = theirs.load_state_dict(reference.state, strict=False)
        assert not missing and unexpected and all(k.startswith("blocks.4.shortcut.") for k in unexpected)
        assert isinstance(ours.blocks.block5.shortcut, nn.Sequential)
        return
    theirs.load_state_dict(reference.state)
    expected = logits(theirs, x)
    assert relative_error(expected[0], expected[1]) > 100 * TOLERANCE
    assert relative_error(actual, expected) <= TOLERANCE


# --- registered weights --------------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "digest", "num_bytes", "top1", "top5"), [
    ("xception41", "e6439c97", 108_422_028, 78.54, 94.28),
    ("xception65", "c9ae96e8", 160_536_780, 79.55, 94.66),
    ("xception71", "8eec7df1", 170_295_556, 79.88, 94.93),
])
def test_registered_weights_metadata(model: str, digest: str, num_bytes: int, top1: float, top5: float) -> None:
    assert "tf_in1k" in xception.list_weights(model)
    assert f"{model}.tf_in1k" in xception.list_weights()
    registered = xception.get_weights(model, "tf_in1k")
    filename = f"tf_xception_{model.removeprefix('xception')}-{digest}.pth"
    assert registered.model == model and registered.name == "tf_in1k"
    assert registered.file.filename == filename  # torch hub's convention: the SHA-256 prefix in the name
    assert registered.file.sha256_prefix == digest and registered.file.md5 is None
    assert registered.file.num_bytes == num_bytes
    assert registered.file.urls == (TIMM_RELEASES + filename,)
    assert registered.notop_file is None and registered.num_classes == 1000
    assert registered.meta["metrics"] == {"ImageNet-1k": {"top1": top1, "top5": top5}}
    assert registered.meta["license"] == "Apache-2.0"
    assert len(registered.categories) == 1000
    assert registered.transform_config["crop_size"] == 299


RA3_PINS = {  # (Hub revision, SHA-256, mirror): see the comment on the ra3_in1k rows of weights/registered.py
    "xception65": ("ae9e1377bca4c1d5ce324a5e010f7bc72bc322a4", None, "xception65_ra3-1447db8d.pth"),
    "xception41p": ("327b9de3a26a7077952e38fe40e9c811b1bba6d1",
                    "84cc7268d4d0973769ac78db2c1d07e5bbfbcab2447d6f1df3f7b755ba7b2dea", "xception41p_ra3-33195bc8.pth"),
    "xception65p": ("main", None, "xception65p_ra3-3c6114e4.pth"),
}


@pytest.mark.parametrize(("model", "top1"), [("xception65", 83.19), ("xception41p", 81.98), ("xception65p", 83.16)])
def test_registered_ra3_weights_metadata(model: str, top1: float) -> None:
    registered = xception.get_weights(model, "ra3_in1k")
    revision, sha256, mirror = RA3_PINS[model]
    assert (registered.file.repo, registered.file.path) == (f"timm/{model}.ra3_in1k", "model.safetensors")
    assert (registered.file.revision, registered.file.sha256) == (revision, sha256)
    assert registered.file.url == f"https://huggingface.co/timm/{model}.ra3_in1k/resolve/{revision}/model.safetensors"
    (release,) = registered.file.mirrors  # timm's GitHub release of the same weights, pinned by its name's prefix
    assert release.urls == ("https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-tpu-weights/"
                            + mirror,)
    assert release.sha256_prefix == mirror.rsplit("-", 1)[1][:8] and release.num_bytes is None
    assert registered.notop_file is None and registered.num_classes == 1000
    assert registered.meta["metrics"] == {"ImageNet-1k": {"top1": top1}}
    assert len(registered.categories) == 1000
    assert registered.transform_config["resize_size"] == 318 and registered.transform_config["crop_size"] == 299


def test_unknown_weights_name_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"no weights named 'imagenet' for model 'xception41'; registered: tf_in1k"):
        xception.create_model("xception41", weights="imagenet")
    with pytest.raises(ValueError, match=r"registered: ra3_in1k, tf_in1k"):
        xception.get_weights("xception65", "in21k")
    with pytest.raises(ValueError, match=r"registered: ra3_in1k; or pass"):
        xception.create_model("xception41p", weights="tf_in1k")


@dataclass
class ServedFile:
    path: Path  # named as the registered file, in a folder of its own
    sha256: str
    state: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> ServedFile:
    """A timm xception41 checkpoint under the registered file name (not the real weights: random, calibrated)."""
    model = calibrated_timm("xception41", seed=100)
    state = snapshot(model)
    path = tmp_path_factory.mktemp("served") / xception.get_weights("xception41", "tf_in1k").file.filename
    torch.save(state, path)
    return ServedFile(path, hub.digests(path)[1], state)




def register_local(monkeypatch: pytest.MonkeyPatch, base_url: str, served: ServedFile,
                   sha256_prefix: str | None = None) -> weights_module.Weights:
    """Point xception41's tf_in1k at ``base_url`` and the served file (monkeypatch restores the registry)."""
    registered = xception.get_weights("xception41", "tf_in1k")
    file = dataclasses.replace(registered.file, urls=(f"{base_url}/{registered.file.filename}",),
                               num_bytes=served.path.stat().st_size,
                               sha256_prefix=sha256_prefix or served.sha256[:8])
    patched = dataclasses.replace(registered, file=file)
    monkeypatch.setitem(weights_module._REGISTRY, ("xception41", "tf_in1k"), patched)
    return patched


def test_download_verifies_caches_and_loads(served: ServedFile, torch_home: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    filename = served.path.name
    with serve_directory(served.path.parent) as server:
        register_local(monkeypatch, server.base_url, served)
        downloaded = xception.create_model("xception41", weights="tf_in1k")
        assert server.requests == [f"/{filename}"]
        cached = torch_home / filename
        assert cached.is_file() and hub.digests(cached)[1] == served.sha256
        assert list(torch_home.glob("*.part")) == []
        xception.load_weights(downloaded, "tf_in1k")
        assert server.requests == [f"/{filename}"]  # the second time, from the cache
    from_path = xception.create_model("xception41", weights=served.path)
    assert_same_state(downloaded, snapshot(from_path))
    assert torch.equal(downloaded.blocks.stem.conv1_bn.running_var, served.state["stem.0.bn.running_var"])
    x = images((64, 64))
    assert torch.equal(logits(downloaded, x), logits(from_path, x))


def test_wrong_sha256_prefix_is_refused(served: ServedFile, torch_home: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "00000000" if not served.sha256.startswith("00000000") else "ffffffff"
    model = xception.create_model("xception41")
    before = snapshot(model)
    with serve_directory(served.path.parent) as server:
        register_local(monkeypatch, server.base_url, served, sha256_prefix=wrong)
        with pytest.raises(WeightsUnavailableError, match="checksum mismatch") as info:
            xception.load_weights(model, "tf_in1k")
        with pytest.raises(WeightsUnavailableError, match=f"sha256 starting {wrong}"):
            xception.create_model("xception41", weights="tf_in1k")
        assert server.requests == [f"/{served.path.name}"] * 2  # nothing was cached the first time
    assert wrong in str(info.value) and served.sha256 in str(info.value)
    assert_same_state(model, before)
    assert not (torch_home / served.path.name).exists()


def test_registry_is_restored() -> None:
    """Runs after the download tests (pytest keeps file order): their registry patches must not leak."""
    file = xception.get_weights("xception41", "tf_in1k").file
    assert file.sha256_prefix == "e6439c97" and file.urls == (TIMM_RELEASES + file.filename,)


def test_hub_weights_download_pinned_and_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """xception41p.ra3_in1k end to end against a local stand-in for the Hub: a timm checkpoint (random, calibrated,
    not the real weights) as safetensors, with the registry's pins pointed at the stand-in's commit and file."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    theirs = calibrated_timm("xception41p", seed=101)
    save_file(snapshot(theirs), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    repo = "timm/xception41p.ra3_in1k"
    with serve_hub() as stand_in:
        commit = stand_in.publish(repo, {"model.safetensors": data})
        registered = xception.get_weights("xception41p", "ra3_in1k")
        file = dataclasses.replace(registered.file, revision=commit, endpoint=stand_in.base_url,
                                   sha256=hub.digests(tmp_path / "model.safetensors")[1])
        monkeypatch.setitem(weights_module._REGISTRY, ("xception41p", "ra3_in1k"),
                            dataclasses.replace(registered, file=file))
        ours = xception.create_model("xception41p", weights="ra3_in1k").eval()
        assert stand_in.downloads() == [f"/{repo}/resolve/{commit}/model.safetensors"]
    x = images((64, 64))
    assert relative_error(logits(ours, x), logits(theirs, x)) <= TOLERANCE


# --- in_chans adaptation of registered weights ----------------------------------------------------------

@pytest.fixture
def local_tf_in1k(served: ServedFile, monkeypatch: pytest.MonkeyPatch) -> ServedFile:
    """Registered weights come from the served file, without a download."""
    expected = xception.get_weights("xception41", "tf_in1k").file

    def fetch(file: hub.WeightFile, **_kwargs: object) -> Path:
        assert file == expected
        return served.path

    monkeypatch.setattr(weights_loading, "fetch", fetch)
    return served


@pytest.fixture
def rgb_model(local_tf_in1k: ServedFile) -> nn.Module:
    return xception.create_model("xception41", weights="tf_in1k").eval()


def assert_same_except_first_conv(model: nn.Module, rgb_model: nn.Module) -> None:
    reference = rgb_model.state_dict()
    for name, tensor in model.state_dict().items():
        if name != "blocks.stem.conv1.weight":
            assert torch.equal(tensor, reference[name]), name


def test_one_channel_weights_sum_the_rgb_filters(local_tf_in1k: ServedFile, rgb_model: nn.Module) -> None:
    grey_model = xception.create_model("xception41", in_chans=1, weights="tf_in1k").eval()
    rgb = local_tf_in1k.state["stem.0.conv.weight"]
    adapted = grey_model.blocks.stem.conv1.weight
    assert adapted.shape == (32, 1, 3, 3)
    torch.testing.assert_close(adapted, rgb.sum(dim=1, keepdim=True), rtol=1e-6, atol=1e-7)
    assert_same_except_first_conv(grey_model, rgb_model)
    grey = images((64, 64), channels=1, seed=3)
    expected = logits(rgb_model, grey.expand(-1, 3, -1, -1))
    assert relative_error(expected[0], expected[1]) > 100 * TOLERANCE
    assert relative_error(logits(grey_model, grey), expected) <= TOLERANCE


def test_six_channel_weights_repeat_and_halve(local_tf_in1k: ServedFile, rgb_model: nn.Module) -> None:
    model = xception.create_model("xception41", in_chans=6, weights="tf_in1k").eval()
    rgb = local_tf_in1k.state["stem.0.conv.weight"]
    adapted = model.blocks.stem.conv1.weight
    assert adapted.shape == (32, 6, 3, 3)
    torch.testing.assert_close(adapted, rgb.repeat(1, 2, 1, 1) * 0.5, rtol=1e-6, atol=1e-7)
    assert_same_except_first_conv(model, rgb_model)
    x = images((64, 64), seed=4)
    expected = logits(rgb_model, x)
    assert relative_error(expected[0], expected[1]) > 100 * TOLERANCE
    assert relative_error(logits(model, torch.cat([x, x], dim=1)), expected) <= TOLERANCE


@pytest.mark.parametrize("num_classes", [10, 0])
def test_registered_weights_for_another_class_count(local_tf_in1k: ServedFile, rgb_model: nn.Module,
                                                    num_classes: int) -> None:
    torch.manual_seed(1)
    fresh = xception.create_model("xception41", num_classes=num_classes)
    new_head = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("head.")}
    torch.manual_seed(1)
    model = xception.create_model("xception41", num_classes=num_classes, weights="tf_in1k")
    state, reference = model.state_dict(), rgb_model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(tensor, new_head[name] if name.startswith("head.") else reference[name]), name


def test_a_three_channel_file_path_is_not_adapted(served: ServedFile) -> None:
    """Only registered weights adapt: an explicit file must fit exactly, and a refusal leaves the model alone."""
    model = xception.create_model("xception41", in_chans=1)
    before = snapshot(model)
    with pytest.raises(xception.WeightFileError,
                       match=r"blocks\.stem\.conv1\.weight expected \(32, 1, 3, 3\), found \(32, 3, 3, 3\)"):
        xception.load_weights(model, served.path)
    assert_same_state(model, before)
    with pytest.raises(xception.WeightFileError, match=r"blocks\.stem\.conv1\.weight"):
        xception.create_model("xception41", in_chans=1, weights=str(served.path))


# --- factory arguments and errors ----------------------------------------------------------------------

def test_dtype_float64() -> None:
    model = xception.create_model("xception41p", dtype=torch.float64).eval()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} == {torch.float64}
    with torch.no_grad():  # the smallest input: float64 convolutions are slow on CPU
        out = model(images((32, 32), batch=1).double())
    assert out.dtype == torch.float64 and out.shape == (1, 1000)


@pytest.mark.parametrize("name", ALIGNED)
def test_meta_device_allocates_nothing(name: str) -> None:
    model = xception.create_model(name, device="meta")
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.is_meta for t in tensors)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]


def test_cpu_device() -> None:
    model = xception.create_model("xception65p", device="cpu", num_classes=10).eval()
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    with torch.no_grad():
        assert model(images((64, 64))).shape == (2, 10)


@pytest.mark.parametrize("name", ALIGNED)
def test_unknown_option_lists_the_valid_ones(name: str) -> None:
    with pytest.raises(TypeError, match=rf"unknown {name} option\(s\) \['middle_repeats'\]") as info:
        xception.create_model(name, middle_repeats=4)
    for option in ("num_classes", "in_chans", "global_pool", "drop_rate", "drop_path_rate", "output_stride",
                   "multi_grid"):
        assert option in str(info.value), option


def test_unknown_model_lists_every_model() -> None:
    assert xception.list_models("classification") == ALL_MODELS
    with pytest.raises(ValueError, match="unknown model 'xception42'") as info:
        xception.create_model("xception42")
    for name in ALL_MODELS:
        assert f"{name}," in str(info.value) + ",", name
