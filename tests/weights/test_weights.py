"""Loading, refusing and saving weight files, the registered weights, and the download path without internet."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision
from http_server import closed_port_url, serve_directory, serve_hub
from keras_reference import random_keras_h5
from PIL import Image
from torch import nn

import xception
from xception.weights import download as hub
from xception.weights import loading as weights_loading
from xception.weights import registered as weights_module
from xception.weights.download import WeightsUnavailableError
from xception.weights.formats import WeightFileError, read_safetensors_metadata

SMALL = (96, 96)


# --- helpers ------------------------------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name]), name


def assert_refused(model: nn.Module, path: Path | str, *needles: str) -> str:
    """Loading ``path`` raises WeightFileError mentioning every needle, and leaves ``model`` exactly as it was."""
    before = snapshot(model)
    with pytest.raises(WeightFileError) as info:
        xception.load_weights(model, path)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    assert_same_state(model, before)
    return message


def calibrate(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN scales and shifts, statistics from a real batch, then perturbed: with statistics that do not
    fit the activations, the output hardly depends on the input and comparing outputs proves little."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in norms]
    with torch.no_grad():
        for bn in norms:
            bn.weight.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=generator) * 0.2)
            bn.momentum = None  # cumulative: one pass gives exactly the batch statistics
        model.train()(torch.rand(4, model.in_chans, *SMALL, generator=generator) * 2 - 1)
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
            bn.running_mean += 0.1 * bn.running_var.sqrt() * torch.randn(bn.num_features, generator=generator)
            bn.running_var *= torch.rand(bn.num_features, generator=generator) * 0.7 + 0.7
    return model.eval()


def logits(model: nn.Module, size: tuple[int, int] = SMALL) -> torch.Tensor:
    x = torch.rand(2, model.in_chans, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def keras_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keras-written weight files, named as the registered ones, in a folder the download tests serve."""
    folder = tmp_path_factory.mktemp("keras_files")
    registered = xception.get_weights("xception", "imagenet")
    random_keras_h5(folder / registered.file.filename, include_top=True, seed=3)
    random_keras_h5(folder / registered.notop_file.filename, include_top=False, seed=4)
    return folder


@pytest.fixture(scope="module")
def keras_top(keras_dir: Path) -> Path:
    return keras_dir / xception.get_weights("xception", "imagenet").file.filename


@pytest.fixture(scope="module")
def keras_notop(keras_dir: Path) -> Path:
    return keras_dir / xception.get_weights("xception", "imagenet").notop_file.filename


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """One model for all the refusals: each checks that it leaves the model exactly as it was."""
    return xception.create_model("xception")


# --- files that are not weights, or not these weights -------------------------------------------------

def test_truncated_keras_file(keras_top: Path, model: nn.Module, tmp_path: Path) -> None:
    data = keras_top.read_bytes()
    path = tmp_path / "truncated.h5"
    path.write_bytes(data[: len(data) // 2])
    assert_refused(model, path, str(path), "Keras HDF5", "truncated or corrupt")


def test_corrupt_hdf5_file(model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "corrupt.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + np.random.default_rng(0).bytes(100_000))
    assert_refused(model, path, str(path), "truncated or corrupt")


def test_hdf5_file_that_is_not_keras_weights(model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros((4, 8, 8), dtype="float32"))
    assert_refused(model, path, "not a Keras weight file", "layer_names")


def test_resnet_state_dict(model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    assert_refused(model, path, "not an Xception", "'conv1.weight'", "'bn1.weight'")


def test_full_keras_file_into_model_without_classifier(keras_top: Path) -> None:
    features = xception.create_model("xception", num_classes=0)
    assert_refused(features, keras_top, "classifier", "'dense_2'", "num_classes=1000", "no-top")


def test_three_channel_file_into_one_channel_model(keras_notop: Path) -> None:
    gray = xception.create_model("xception", in_chans=1, num_classes=0)
    assert_refused(gray, keras_notop, "blocks.block1.conv1.weight", "expected (32, 1, 3, 3)", "found (32, 3, 3, 3)")


def test_ten_class_file_into_thousand_class_model(model: nn.Module, tmp_path: Path) -> None:
    path = xception.save_weights(xception.create_model("xception", num_classes=10), tmp_path / "ten.safetensors")
    message = assert_refused(model, path, "does not fit", "num_classes=10", "reset_classifier")
    # safetensors keeps tensors sorted by name, so the bias is the first mismatch met
    assert re.search(r"head\.predictions\.(weight expected \(1000, 2048\), found \(10, 2048\)|"
                     r"bias expected \(1000,\), found \(10,\))", message), message


def test_empty_file(model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    path.touch()
    assert_refused(model, path, str(path), "empty")


def test_text_file(model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "weights.h5"  # the extension does not matter: formats are read from the content
    path.write_text("<html><body>404 Not Found</body></html>\n")
    assert_refused(model, path, str(path), "not a weight file", "b'<html><b'")


def test_missing_path(model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "weights.h5"
    assert_refused(model, path, str(path), "does not exist")


class RunsShellCommand:
    """Unpickling this runs a shell command: what a hostile checkpoint would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 2"])
def test_pickle_with_code_is_not_run(writer: str, model: nn.Module, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"conv1.weight": torch.zeros(1)}, "hook": RunsShellCommand(f"touch '{marker}'")}
    path = tmp_path / "hostile.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert_refused(model, path, str(path), "contain code rather than tensors")
    assert not marker.exists()
    # The refusal matters: unpickled without weights_only, the same file does run its command.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


# --- saving ---------------------------------------------------------------------------------------------

CONFIG = {"num_classes": 7, "middle_repeats": 2, "mid_activation": "bn", "fc_layers": (64,)}


@pytest.fixture(scope="module")
def small_model() -> nn.Module:
    torch.manual_seed(5)
    return calibrate(xception.create_model("xception", **CONFIG), seed=5).eval()


def test_save_and_load_round_trip(small_model: nn.Module, tmp_path: Path) -> None:
    path = xception.save_weights(small_model, tmp_path / "small.safetensors")
    assert path == tmp_path / "small.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.safetensors"]  # no temporary file left
    fresh = xception.create_model("xception", **CONFIG)
    assert not torch.equal(fresh.head.predictions.weight, small_model.head.predictions.weight)
    assert xception.load_weights(fresh, path) == "xception safetensors"
    assert_same_state(fresh, snapshot(small_model))
    expected = logits(small_model)
    assert torch.equal(logits(fresh), expected)
    assert expected.shape == (2, 7) and (expected[0] - expected[1]).abs().max() > 1e-3


def test_saved_metadata_rebuilds_the_model(small_model: nn.Module, tmp_path: Path) -> None:
    path = xception.save_weights(small_model, tmp_path / "small.safetensors")
    meta = read_safetensors_metadata(path)
    assert meta["format"] == "xception" and meta["model"] == "xception"
    architecture = json.loads(meta["architecture"])
    assert architecture == json.loads(json.dumps(small_model.architecture()))
    assert architecture["num_classes"] == 7 and architecture["middle_repeats"] == 2
    assert architecture["mid_activation"] == "bn" and architecture["fc_layers"] == [64]
    rebuilt = xception.create_model(meta["model"], weights=path, **architecture)
    assert torch.equal(logits(rebuilt), logits(small_model))


def test_interrupted_save_keeps_the_good_file(small_model: nn.Module, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "small.safetensors"
    good = xception.create_model("xception", **CONFIG)
    xception.save_weights(good, path)
    original = path.read_bytes()
    written: list[str] = []

    def save_file_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial" * 1000)
        written.append(str(filename))
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file_then_fail)
    with pytest.raises(OSError, match="No space left"):
        xception.save_weights(small_model, path)
    assert written and written[0] != str(path)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # the partial file is cleaned up
    monkeypatch.undo()
    reloaded = xception.create_model("xception", **CONFIG, weights=path)
    assert_same_state(reloaded, snapshot(good))


# --- weights="hf-hub:org/name[@revision]": a Hub repository's model.safetensors -----------------------------

def test_hub_repository_as_weights(small_model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one resolver (load_weights, so create_model and train --weights too) takes a Hub repository, through
    huggingface_hub and its cache, against a local stand-in for the Hub named by HF_ENDPOINT; @revision pins it."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    first = xception.save_weights(small_model, tmp_path / "first.safetensors").read_bytes()
    other = calibrate(xception.create_model("xception", **CONFIG), seed=6)
    second = xception.save_weights(other, tmp_path / "second.safetensors").read_bytes()
    with serve_hub() as stand_in:
        monkeypatch.setenv("HF_ENDPOINT", stand_in.base_url)
        old = stand_in.publish("me/small", {"model.safetensors": first})
        stand_in.publish("me/small", {"model.safetensors": second})
        assert weights_loading.registered_weights("xception", "hf-hub:me/small") is None
        latest = xception.create_model("xception", **CONFIG, weights="hf-hub:me/small")
        pinned = xception.create_model("xception", **CONFIG, weights=f"hf-hub:me/small@{old}")
        assert stand_in.downloads() == ["/me/small/resolve/main/model.safetensors",
                                        f"/me/small/resolve/{old}/model.safetensors"]
        new_head = xception.create_model("xception", **{**CONFIG, "num_classes": 3})
        head = snapshot(new_head)["head.predictions.weight"]
        xception.load_weights(new_head, "hf-hub:me/small", new_head=True)  # fine-tuning: the classifier stays new
        with pytest.raises(WeightsUnavailableError, match="RepositoryNotFoundError"):
            xception.create_model("xception", **CONFIG, weights="hf-hub:me/missing")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(WeightsUnavailableError) as info:
            xception.create_model("xception", **CONFIG, weights="hf-hub:me/small@v2")
        for needle in ("model.safetensors of me/small at revision v2", "hf download me/small model.safetensors "
                       "--revision v2", str(tmp_path / "hf-cache"), "weights=<path>"):
            assert needle in str(info.value), needle
        assert xception.create_model("xception", **CONFIG, weights=f"hf-hub:me/small@{old}")  # cached: offline is fine
    assert_same_state(latest, snapshot(other))
    assert_same_state(pinned, snapshot(small_model))
    assert torch.equal(new_head.state_dict()["head.predictions.weight"], head)
    stem = "blocks.block1.conv1.weight"
    assert torch.equal(new_head.state_dict()[stem], other.state_dict()[stem])


# --- the registered weights ------------------------------------------------------------------------

def test_registered_imagenet_metadata() -> None:
    weights = xception.get_weights("xception", "imagenet")
    assert xception.list_weights("xception") == ["imagenet"]
    assert "xception.imagenet" in xception.list_weights()
    meta = weights.meta
    assert meta["num_params"] == 22_855_952 == sum(p.numel() for p in xception.create_model("xception").parameters())
    assert meta["metrics"]["ImageNet-1k"] == {"top1": 79.0, "top5": 94.5}
    assert meta["license"] == "MIT"
    assert "Keras" in meta["source"] and "Chollet" in meta["source"]
    assert weights.num_classes == 1000
    categories = weights.categories
    assert len(categories) == 1000 == len(set(categories))
    assert categories[0] == "tench" and categories[1] == "goldfish"


def test_registered_files() -> None:
    weights = xception.get_weights("xception", "imagenet")
    top, notop = weights.file, weights.notop_file
    assert (top.filename, top.md5, top.num_bytes) == (
        "xception_weights_tf_dim_ordering_tf_kernels.h5", "0a58e3b7378bc2990ea3b43d5981f1f6", 91_884_032)
    assert (notop.filename, notop.md5, notop.num_bytes) == (
        "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", "b0042744bf5b25fce3cb969f33bebb97", 83_683_744)
    for file in (top, notop):
        assert len(file.urls) >= 2 and all(url.startswith("https://") and url.endswith(file.filename)
                                            for url in file.urls)
    assert weights.file_for(1000) is top
    assert weights.file_for(0) is notop
    assert weights.file_for(10) is notop


@pytest.mark.parametrize("size", [(640, 480), (299, 299), (120, 80), (37, 500)])
def test_transforms_any_image_size(size: tuple[int, int]) -> None:
    transform = xception.get_weights("xception", "imagenet").transforms()
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    x = transform(Image.fromarray(noise))
    assert x.shape == (3, 299, 299) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() < -0.9 and x.max() > 0.9  # the range is used, not squashed
    white = transform(Image.new("RGB", size, (255, 255, 255)))
    black = transform(Image.new("L", size, 0))  # grey-scale images become 3 channels
    assert white.shape == black.shape == (3, 299, 299)
    assert torch.all(white == 1.0) and torch.all(black == -1.0)


def test_unknown_weights_name() -> None:
    with pytest.raises(ValueError, match=r"no weights named 'imagenet21k'.*registered: imagenet"):
        xception.get_weights("xception", "imagenet21k")
    with pytest.raises(ValueError, match=r"'imagenet21k'.*registered: imagenet"):
        xception.create_model("xception", weights="imagenet21k")


# --- the download path, against a local server -----------------------------------------------------------



@pytest.fixture(scope="module")
def served_files(keras_top: Path, keras_notop: Path) -> dict[str, tuple[str, str, int]]:
    return {path.name: (*hub.digests(path), path.stat().st_size) for path in (keras_top, keras_notop)}


def register_local(monkeypatch: pytest.MonkeyPatch, base_url: str, files: dict[str, tuple[str, str, int]],
                   corrupt: str | None = None) -> weights_module.Weights:
    """Point the registered ImageNet weights at ``base_url``, pinned to the local files' MD5 and SHA-256 (the
    monkeypatch restores the registry). ``corrupt="md5"`` or ``"sha256"`` pins that digest to a wrong value."""
    registered = xception.get_weights("xception", "imagenet")

    def local(file: hub.WeightFile) -> hub.WeightFile:
        md5, sha256, size = files[file.filename]
        md5 = "0" * 32 if corrupt == "md5" else md5
        sha256 = "0" * 64 if corrupt == "sha256" else sha256
        return dataclasses.replace(file, urls=(f"{base_url}/{file.filename}",), md5=md5, sha256_prefix=sha256,
                                   num_bytes=size)

    patched = dataclasses.replace(registered, file=local(registered.file), notop_file=local(registered.notop_file))
    monkeypatch.setitem(weights_module._REGISTRY, ("xception", "imagenet"), patched)
    return patched


def test_download_verifies_caches_and_loads(keras_dir, keras_top, served_files, torch_home,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with serve_directory(keras_dir) as server:
        register_local(monkeypatch, server.base_url, served_files)
        downloaded = xception.create_model("xception", weights="imagenet")
        assert downloaded.pretrained_weights is xception.get_weights("xception", "imagenet")
        assert downloaded.pretrained_weights.transforms().crop_size == 299
        cached = torch_home / keras_top.name
        assert cached.read_bytes() == keras_top.read_bytes()
        assert server.requests == [f"/{keras_top.name}"]
        assert list(torch_home.glob("*.part")) == []
        from_path = xception.create_model("xception", weights=keras_top)
        assert_same_state(downloaded, snapshot(from_path))
        assert not torch.all(downloaded.blocks.block1.conv1_bn.running_var == 1)  # the file's, not the defaults
        assert torch.equal(logits(downloaded), logits(from_path))
        xception.load_weights(from_path, "imagenet")
        assert server.requests == [f"/{keras_top.name}"]  # the second time, from the cache


def test_download_for_new_classifier_takes_the_notop_file(keras_dir, keras_notop, served_files, torch_home,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    finetune = xception.create_model("xception", num_classes=10)
    new_head = {k: v.clone() for k, v in finetune.state_dict().items() if k.startswith("head.")}
    with serve_directory(keras_dir) as server:
        register_local(monkeypatch, server.base_url, served_files)
        xception.load_weights(finetune, "imagenet")
        assert server.requests == [f"/{keras_notop.name}"]
        # the README's one-liner does the same
        built = xception.create_model("xception", weights="imagenet", num_classes=10)
    assert (torch_home / keras_notop.name).is_file()
    backbone = snapshot(xception.create_model("xception", num_classes=0, weights=keras_notop))
    state = finetune.state_dict()
    assert state["head.predictions.weight"].shape == (10, 2048)
    for name, tensor in new_head.items():
        assert torch.equal(state[name], tensor), name  # the new classifier keeps its initialisation
    for name, tensor in backbone.items():
        assert torch.equal(state[name], tensor), name
        assert torch.equal(built.state_dict()[name], tensor), name


def test_offline_error_says_what_to_download_and_where(served_files, torch_home,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    filename = xception.get_weights("xception", "imagenet").file.filename
    with closed_port_url(filename) as url:
        register_local(monkeypatch, url.rsplit("/", 1)[0], served_files)
        with pytest.raises(WeightsUnavailableError) as info:
            xception.create_model("xception", weights="imagenet")
    message = str(info.value)
    for needle in (filename, url, str(torch_home / filename), "weights=<path>"):
        assert needle in message, needle
    assert not (torch_home / filename).exists()


@pytest.mark.parametrize("digest", ["md5", "sha256"])
def test_checksum_mismatch_is_refused(keras_dir, keras_top, served_files, torch_home,
                                      monkeypatch: pytest.MonkeyPatch, digest: str) -> None:
    """Both pins are checked: a file that passes one and fails the other is refused."""
    model = xception.create_model("xception")
    before = snapshot(model)
    with serve_directory(keras_dir) as server:
        patched = register_local(monkeypatch, server.base_url, served_files, corrupt=digest)
        with pytest.raises(WeightsUnavailableError, match="checksum mismatch") as info:
            xception.load_weights(model, "imagenet")
        with pytest.raises(WeightsUnavailableError, match="checksum mismatch"):
            xception.create_model("xception", weights="imagenet")
        assert server.requests == [f"/{keras_top.name}"] * 2  # nothing was cached the first time
    expected = patched.file.md5 if digest == "md5" else patched.file.sha256_prefix
    found = hub.digests(keras_top)[0 if digest == "md5" else 1]
    assert expected in str(info.value) and found in str(info.value)
    assert_same_state(model, before)
    assert not torch_home.exists() or list(torch_home.iterdir()) == []


def test_cached_copy_is_used_offline(keras_top, served_files, torch_home, monkeypatch: pytest.MonkeyPatch) -> None:
    torch_home.mkdir(parents=True)
    shutil.copyfile(keras_top, torch_home / keras_top.name)
    with closed_port_url(keras_top.name) as url:
        register_local(monkeypatch, url.rsplit("/", 1)[0], served_files)
        model = xception.create_model("xception", weights="imagenet")
    assert_same_state(model, snapshot(xception.create_model("xception", weights=keras_top)))


def test_registry_is_restored_between_tests() -> None:
    """Runs last (pytest keeps file order): the download tests' registry patches must not leak."""
    file = xception.get_weights("xception", "imagenet").file
    assert file.md5 == "0a58e3b7378bc2990ea3b43d5981f1f6" and file.urls[0].startswith("https://storage.googleapis")


def test_official_files_are_pinned_by_md5_and_sha256() -> None:
    """The digests of the real files (xception-facts.md: Keras's MD5s, and SHA-256 from the Git LFS pointers of
    public copies), both checked on download."""
    registered = xception.get_weights("xception", "imagenet")
    assert (registered.file.md5, registered.file.sha256_prefix) == (
        "0a58e3b7378bc2990ea3b43d5981f1f6", "c5bf1c05b020c4177164039b854c3ef92b16b73384734647c1f0ad5cf79f6975")
    assert (registered.notop_file.md5, registered.notop_file.sha256_prefix) == (
        "b0042744bf5b25fce3cb969f33bebb97", "e3fa32521ed48ced4af05adc950ab24963c4a00bd42e6825f8b180c65853163c")
    assert "MD5 0a58e3b7378bc2990ea3b43d5981f1f6 and SHA-256 c5bf1c05" in registered.file.pin()


def test_every_registered_entry_has_its_models_parameter_count() -> None:
    for entry in weights_module.WEIGHTS:
        model = xception.create_model(entry.model, num_classes=entry.num_classes, device="meta")
        assert entry.meta["num_params"] == sum(p.numel() for p in model.parameters()), entry.name


def test_every_model_has_default_weights() -> None:
    for name in xception.list_models("classification"):
        default = xception.get_weights(name)
        assert default is xception.get_weights(name, "default")
        assert default.name in xception.list_weights(name)
    assert xception.get_weights("xception65").name == "ra3_in1k"


def test_loaded_weights_are_remembered(keras_top: Path) -> None:
    model = xception.create_model("xception")
    assert model.pretrained_weights is None
    xception.load_weights(model, keras_top)
    assert model.pretrained_weights is None  # a file: no registered metadata to remember
