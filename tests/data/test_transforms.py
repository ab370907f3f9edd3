"""One preprocessing path per set of weights: the Python API (``Weights.transforms()``) and the command line
(``predict``, ``eval``, int8 calibration, ``export``) give the same tensors for the same file, bit for bit.

Every image file here is written by PIL itself (its JPEG, PNG and EXIF writers), so the fixtures need nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageFilter
from timm.data import create_transform, resolve_data_config
from torch import nn

import xception
import xception.inference
from xception.cli import main
from xception.data.transforms import ClassificationTransform, decode_image, open_image
from xception.hardware import simulate
from xception.inference import calibration_images, load_registered, preprocess_file

ORIENTATION = 0x0112  # the EXIF tag
KINDS = ("photo.jpg", "alpha.png", "sixteen.png", "gray.jpg", "cmyk.jpg", "rotated.jpg")


def smooth_noise(width: int, height: int, seed: int) -> np.ndarray:
    """Photograph-like content (smooth, full range, no symmetry), so that resizing and rotation show."""
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return np.array(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(3)))


def write_images(folder: Path) -> dict[str, Path]:
    """The six kinds of file, written by PIL, none of them square."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / kind for kind in KINDS}
    Image.fromarray(smooth_noise(120, 90, 0)).save(paths["photo.jpg"], quality=90)
    rgba = np.zeros((80, 100, 4), np.uint8)
    rgba[..., :3] = smooth_noise(100, 80, 1)
    rgba[..., :3][:, :40] = 0  # black under the transparent part: Pillow's own convert would show it
    rgba[..., 3] = np.linspace(0, 255, 100, dtype=np.uint8)[None, :]
    Image.fromarray(rgba, "RGBA").save(paths["alpha.png"])
    ramp = np.linspace(0, 65535, 90 * 70).reshape(70, 90).astype(np.uint16)
    Image.fromarray(ramp).save(paths["sixteen.png"])  # mode I;16: a 16-bit grayscale PNG
    Image.fromarray(smooth_noise(90, 110, 2)).convert("L").save(paths["gray.jpg"])
    Image.fromarray(smooth_noise(110, 80, 3)).convert("CMYK").save(paths["cmyk.jpg"])
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # stored 120 wide x 60 high; shown rotated 90 degrees clockwise: 60 wide x 120 high
    Image.fromarray(smooth_noise(120, 60, 4)).save(paths["rotated.jpg"], exif=exif.tobytes())
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def api() -> ClassificationTransform:
    return xception.get_weights("xception", "imagenet").transforms()


class Recorder(nn.Module):
    """Stands in for the registered network (no download): keeps every batch it is given, returns zero logits."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes, self.in_chans = num_classes, 3
        self.batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.detach().clone())
        return torch.zeros(len(x), self.num_classes)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """``load_registered`` (the loader of ``--weights``) builds this instead of downloading the weights."""
    model = Recorder(1000)

    def create_model(name: str, *, weights: str) -> Recorder:
        assert (name, weights) == ("xception", "imagenet")
        return model

    monkeypatch.setattr(xception.inference, "create_model", create_model)
    return model


def test_fixtures_are_the_kinds_they_claim(images: dict[str, Path]) -> None:
    modes = {}
    for kind, path in images.items():
        with Image.open(path) as image:
            modes[kind] = image.mode
            if kind == "rotated.jpg":
                assert image.getexif()[ORIENTATION] == 6 and image.size == (120, 60)
    assert modes == {"photo.jpg": "RGB", "alpha.png": "RGBA", "sixteen.png": "I;16", "gray.jpg": "L",
                     "cmyk.jpg": "CMYK", "rotated.jpg": "RGB"}


@pytest.mark.parametrize("kind", KINDS)
def test_cli_and_api_give_identical_tensors(kind: str, images: dict[str, Path], api: ClassificationTransform,
                                            recorder: Recorder) -> None:
    loaded = load_registered("xception", "imagenet")
    cli = preprocess_file(loaded, images[kind])  # what predict, and load_images for int8, do with a file
    with Image.open(images[kind]) as image:
        from_pil = api(image)  # the API as documented: Image.open, then the weights' transforms
    assert cli.shape == (3, 299, 299) and cli.dtype == torch.float32
    assert torch.equal(cli, from_pil)
    assert torch.equal(cli, api(images[kind]))  # the API also takes the path
    assert torch.equal(cli, api(open_image(images[kind])))


def test_predict_command_feeds_the_model_the_api_tensors(images: dict[str, Path], api: ClassificationTransform,
                                                         recorder: Recorder, capsys: pytest.CaptureFixture) -> None:
    files = [str(images[kind]) for kind in KINDS]
    with simulate(cpu_bf16=False):  # precision auto runs the model as loaded (fp32), not a deployed copy of it
        assert main(["predict", "--weights", "imagenet", *files, "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(KINDS)
    [batch] = recorder.batches
    assert torch.equal(batch, torch.stack([api(Image.open(path)) for path in files]))


def test_eval_command_and_int8_calibration_use_the_api_tensors(tmp_path: Path, api: ClassificationTransform,
                                                               recorder: Recorder,
                                                               capsys: pytest.CaptureFixture) -> None:
    recorder.num_classes = 2  # two class folders
    for split in ("train", "val"):
        write_images(tmp_path / "data" / split / "a")
        (tmp_path / "data" / split / "a" / "rotated.jpg").rename(tmp_path / "data" / split / "b.jpg")
        (tmp_path / "data" / split / "b").mkdir()
        (tmp_path / "data" / split / "b.jpg").rename(tmp_path / "data" / split / "b" / "rotated.jpg")
    files = sorted((tmp_path / "data" / "val").rglob("*.*"))  # the dataset's order: class folders, then names
    expected = torch.stack([api(Image.open(path)) for path in files])
    with simulate(cpu_bf16=False):  # precision auto evaluates the model as loaded (fp32), not a deployed copy
        code = main(["eval", "--weights", "imagenet", "--data", str(tmp_path / "data"), "--output",
                     str(tmp_path / "out"), "--json"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["samples"] == len(KINDS)
    [batch] = recorder.batches
    assert torch.equal(batch, expected)
    assert (tmp_path / "out" / "confusion-val.png").is_file()
    calibration = calibration_images(load_registered("xception", "imagenet"), str(tmp_path / "data"), count=16)
    assert torch.equal(calibration, expected)  # train/ holds the same files


def test_export_records_the_weights_preprocessing(tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    import onnx
    from onnx import TensorProto, helper

    import xception.deploy

    def export_onnx(model: nn.Module, path: Path, *, img_size: int, dynamic_size: bool) -> Path:  # deploy's business
        assert model is recorder and img_size == 299 and not dynamic_size  # the weights' crop size, classification
        graph = helper.make_graph([helper.make_node("Identity", ["images"], ["output"])], "stub",
                                  [helper.make_tensor_value_info("images", TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)])
        onnx.save(helper.make_model(graph), str(path))
        return Path(path)

    monkeypatch.setattr(xception.deploy, "export_onnx", export_onnx)
    output = tmp_path / "xception.onnx"
    assert main(["export", "--weights", "imagenet", "--output", str(output), "--no-check"]) == 0
    assert "resize the shorter side to 333 (bicubic), centre crop 299" in capsys.readouterr().out
    metadata = {entry.key: entry.value for entry in onnx.load(str(output)).metadata_props}
    assert json.loads(metadata["xception.preprocessing"]) == {
        "resize_size": 333, "crop_size": 299, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xception.onnx"]


def test_exif_rotation_is_applied(images: dict[str, Path], api: ClassificationTransform) -> None:
    assert open_image(images["rotated.jpg"]).size == (60, 120)  # upright: taller than wide
    with Image.open(images["rotated.jpg"]) as stored:
        stored.load()
        rotated = api(stored)
        assert decode_image(decode_image(stored)).size == (60, 120)  # applying it twice rotates once
        unrotated = stored.copy()
    del unrotated.info["exif"]  # the stored pixels, as a file without the tag would give them
    assert unrotated.getexif().get(ORIENTATION) is None and unrotated.size == (120, 60)
    upright = unrotated.transpose(Image.Transpose.ROTATE_270)  # orientation 6: turn 90 degrees clockwise
    assert torch.equal(rotated, api(upright))
    assert not torch.equal(rotated, api(unrotated))


def test_decoding_shows_images_as_a_viewer_would(images: dict[str, Path], api: ClassificationTransform) -> None:
    with Image.open(images["alpha.png"]) as image:
        composited = api(image)
        naive = api(image.convert("RGB"))  # Pillow alone drops the alpha: black where it was transparent
    # The left edge of the crop is almost transparent over black: white on screen, black in Pillow's RGB.
    assert torch.all(composited[:, :, 0] > 0.7) and torch.all(naive[:, :, 0] < -0.9)
    sixteen = api(images["sixteen.png"])
    assert sixteen.min() < -0.8 and sixteen.max() > 0.8  # the whole ramp, scaled to 8 bits, not clipped to white
    cmyk = api(images["cmyk.jpg"])
    with Image.open(images["cmyk.jpg"]) as image:
        assert torch.equal(cmyk, api(image.convert("RGB")))
    gray = api(images["gray.jpg"])
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


TIMM_NAMES = {"xception.imagenet": "legacy_xception.tf_in1k"}  # the others are named alike in timm


@pytest.mark.parametrize("weights", xception.list_weights())
def test_weights_transforms_are_timms_evaluation_transforms(weights: str, images: dict[str, Path]) -> None:
    """timm's numbers for these weights (79.06 top-1 for the Keras port, and the rest) were measured with its
    evaluation transform: ours is that transform, bit for bit."""
    model, name = weights.split(".")
    ours = xception.get_weights(model, name).transforms()
    config = timm.get_pretrained_cfg(TIMM_NAMES.get(weights, weights)).to_dict()
    theirs = create_transform(**resolve_data_config(pretrained_cfg=config))
    for kind in ("photo.jpg", "alpha.png", "rotated.jpg"):
        image = open_image(images[kind])
        assert torch.equal(ours(image), theirs(image)), kind


def test_tensors_and_one_channel_weights() -> None:
    image = torch.from_numpy(smooth_noise(50, 40, 5)).permute(2, 0, 1).contiguous()
    transform = ClassificationTransform(resize_size=36, crop_size=32)
    assert transform(image).shape == (3, 32, 32)
    # float images skip the rounding to uint8 after the resize, and nothing else
    assert torch.allclose(transform(image), transform(image.float() / 255), atol=1 / 127.5)
    gray = ClassificationTransform(resize_size=36, crop_size=32, mean=(0.5,), std=(0.5,))
    assert gray.mode == "L" and gray(Image.fromarray(smooth_noise(50, 40, 6))).shape == (1, 32, 32)
    with pytest.raises(ValueError, match="mean and std"):
        ClassificationTransform(mean=(0.5, 0.5), std=(0.5, 0.5))
