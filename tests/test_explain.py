"""Grad-CAM (``xception explain``): it finds a cue where the cue is, it is the same through an exported program, it
uses no hooks, and the command line writes one overlay and one JSON line per image."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import xception
from xception.cli import main
from xception.errors import InvalidArgumentError
from xception.explain import CamModel, explain_files, grad_cam, model_pixels, overlay, resolve_class
from xception.inference import load_model, preprocess_file

SIZE = 96
HALF = SIZE // 2
CUE = 10  # side of the white square that makes class 1
MARGIN = 4  # the square keeps this far from the quadrant's edges
CLASSES = ["plain", "cue"]

# A compact Xception with one entry-flow module: its last feature map (stride 4, 24x24 here) sees about 19 pixels
# around each position, and its max-pools spread a response over all of that. With two entry modules (stride 8) it
# would see about 39: a cue would light up a blob wider than a quadrant and the test would measure the receptive
# field, not Grad-CAM. The last map is the one explained, as by default.
ARCHITECTURE = dict(num_classes=2, in_chans=1, stem_stride=1, stem_padding="same", stem_widths=(8, 16),
                    entry_widths=(16,), middle_repeats=0, exit_widths=(32, 48), tail_widths=(48, 64), bn_momentum=0.1)


def cue_images(count: int, generator: torch.Generator, with_cue: bool) -> torch.Tensor:
    """Dark noise in [-1, 1] (as preprocessing makes of a PNG), with a white square in the top-left quadrant."""
    images = (torch.randn(count, 1, SIZE, SIZE, generator=generator) * 0.4 - 0.4).clamp(-1, 1)
    if with_cue:
        for image in images:
            top, left = torch.randint(MARGIN, HALF - MARGIN - CUE + 1, (2,), generator=generator).tolist()
            image[:, top: top + CUE, left: left + CUE] = 1.0
    return images


def labelled_batch(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    half = count // 2
    images = torch.cat([cue_images(half, generator, False), cue_images(count - half, generator, True)])
    return images, torch.tensor([0] * half + [1] * (count - half))


def train_until_accurate(seed: int, max_steps: int = 150) -> tuple[nn.Module, int, float]:
    """The compact model trained with Adam until it tells the two classes apart on held-out images (checked every
    10 steps, in eval mode); returns it, the steps it took and its held-out accuracy."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    held_out, held_out_labels = labelled_batch(32, generator)
    model = xception.create_model("xception", **ARCHITECTURE)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    accuracy, step = 0.0, 0
    while step < max_steps and accuracy < 0.97:
        model.train()
        for _ in range(10):
            images, labels = labelled_batch(16, generator)
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        step += 10
        with torch.no_grad():
            accuracy = (model.eval()(held_out).argmax(dim=1) == held_out_labels).float().mean().item()
    return model.eval(), step, accuracy


@pytest.fixture(scope="module")
def trained(one_thread) -> nn.Module:
    """A model that has learnt the task (20 steps for this seed, a few seconds); Grad-CAM of an untrained one means
    nothing. Over seeds 0-9 it took 20-60 steps and put 82-97% of the heatmap on the cue's quadrant."""
    model, steps, accuracy = train_until_accurate(seed=0)
    assert accuracy >= 0.97, f"the model did not learn the task in {steps} steps (held-out accuracy {accuracy:.3f})"
    return model


@pytest.fixture
def no_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any hook registration fails: Grad-CAM must work from forward_intermediates alone."""
    def refuse(*args, **kwargs):
        raise AssertionError("Grad-CAM registered a hook")

    for name in ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
                 "register_backward_hook"):
        monkeypatch.setattr(nn.Module, name, refuse)
    monkeypatch.setattr(torch.Tensor, "register_hook", refuse)
    monkeypatch.setattr(torch.Tensor, "retain_grad", refuse)


def test_grad_cam_puts_the_class_on_the_quadrant_of_its_cue(trained: nn.Module, no_hooks: None) -> None:
    images = cue_images(6, torch.Generator().manual_seed(1), with_cue=True)
    heatmaps, logits = grad_cam(trained, images, target=1)  # the last feature map: stride 4, 24x24
    assert heatmaps.shape == (6, SIZE, SIZE)
    assert heatmaps.min() >= 0 and torch.allclose(heatmaps.amax(dim=(1, 2)), torch.ones(6))
    assert (logits.argmax(dim=1) == 1).all()
    mass = heatmaps[:, :HALF, :HALF].sum(dim=(1, 2)) / heatmaps.sum(dim=(1, 2))
    assert mass.mean() >= 0.8, f"share of the heatmap on the cue's quadrant: {mass.tolist()}"


def test_every_stage_is_explained_from_the_forward_pass_that_gave_the_logits(trained: nn.Module,
                                                                               no_hooks: None) -> None:
    images = cue_images(2, torch.Generator().manual_seed(2), with_cue=True)
    with torch.no_grad():
        expected = trained(images)
    for stage in range(len(trained.feature_info)):
        feature_map, logits = CamModel(trained, stage)(images)
        torch.testing.assert_close(logits, expected)
        assert feature_map.shape[1] == trained.feature_info[stage]["num_chs"]
        # Not detached, not a copy the logits ignore: autograd.grad would raise, or give zeros.
        (gradient,) = torch.autograd.grad(logits[:, 1].sum(), feature_map)
        assert gradient.abs().sum() > 0
        heatmaps, _ = grad_cam(trained, images, 1, stage=stage)
        assert heatmaps.shape == (2, SIZE, SIZE) and heatmaps.isfinite().all()


def test_at_the_last_map_grad_cam_is_the_class_activation_map_of_the_classifier(trained: nn.Module) -> None:
    """Global average pooling then a linear layer: dy_c/dA_k is w_ck / HW everywhere, so Grad-CAM reduces to Zhou et
    al.'s CAM, ReLU(sum_k w_ck A_k), computed here from the classifier's weights without any gradient."""
    images = cue_images(3, torch.Generator().manual_seed(8), with_cue=True)
    with torch.no_grad():
        feature_map, _ = CamModel(trained)(images)
        cam = torch.einsum("k,nkhw->nhw", trained.get_classifier().weight[1], feature_map).relu()
    cam = nn.functional.interpolate(cam[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    low, high = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
    heatmaps, _ = grad_cam(trained, images, 1)
    torch.testing.assert_close(heatmaps, (cam - low) / (high - low), rtol=0, atol=1e-5)


def test_grad_cam_is_the_same_through_an_exported_program(trained: nn.Module) -> None:
    images = cue_images(2, torch.Generator().manual_seed(3), with_cue=True)
    exported = torch.export.export(CamModel(trained).eval(), (images,)).module()
    eager, eager_logits = grad_cam(trained, images, target=1)
    through_export, export_logits = grad_cam(exported, images, target=1)
    torch.testing.assert_close(through_export, eager, rtol=0, atol=1e-5)
    torch.testing.assert_close(export_logits, eager_logits, rtol=0, atol=1e-5)
    assert eager.amax() == 1


def test_targets(trained: nn.Module) -> None:
    generator = torch.Generator().manual_seed(4)
    images = torch.cat([cue_images(1, generator, False), cue_images(1, generator, True)])
    predicted, logits = grad_cam(trained, images)
    assert logits.argmax(dim=1).tolist() == [0, 1]
    per_image, _ = grad_cam(trained, images, torch.tensor([0, 1]))
    torch.testing.assert_close(per_image, predicted)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        grad_cam(trained, images, 2)
    with pytest.raises(InvalidArgumentError, match=r"stage 4 is out of range: this model has 3 feature maps"):
        grad_cam(trained, images, stage=4)
    assert resolve_class("cue", CLASSES) == 1 and resolve_class("0", CLASSES) == 0 and resolve_class(1, CLASSES) == 1
    with pytest.raises(InvalidArgumentError, match="unknown class 'dog'"):
        resolve_class("dog", CLASSES)


def test_a_model_in_training_mode_is_explained_in_eval_mode_and_left_as_it_was(trained: nn.Module) -> None:
    images = cue_images(2, torch.Generator().manual_seed(5), with_cue=True)
    expected, _ = grad_cam(trained, images, 1)
    statistics = trained.blocks.block1.conv1_bn.running_mean.clone()
    trained.train()
    try:
        heatmaps, _ = grad_cam(trained, images, 1)
        assert trained.training
    finally:
        trained.eval()
    torch.testing.assert_close(heatmaps, expected)
    assert torch.equal(trained.blocks.block1.conv1_bn.running_mean, statistics)


# ------------------------------------------------------------------------------------------------ command line

def write_png(path: Path, image: torch.Tensor) -> Path:
    pixels = ((image[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(pixels, mode="L").save(path)
    return path


@pytest.fixture(scope="module")
def run_folder(trained: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as training leaves it, as far as loading is concerned: weights, class names, image size."""
    folder = tmp_path_factory.mktemp("run")
    xception.save_weights(trained, folder / "best.safetensors")
    (folder / "config.json").write_text(json.dumps({"classes": CLASSES, "recipe": {"img_size": SIZE}}))
    return folder


@pytest.fixture
def pictures(tmp_path: Path) -> list[Path]:
    generator = torch.Generator().manual_seed(6)
    folder = tmp_path / "pictures"
    folder.mkdir()
    return [write_png(folder / "cue.png", cue_images(1, generator, True)[0]),
            write_png(folder / "plain.png", cue_images(1, generator, False)[0])]


def run_cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, list[str], list[str]]:
    code = main(["explain", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


def test_cli_writes_an_overlay_and_a_json_line_per_image(run_folder: Path, pictures: list[Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "cams"
    code, out, err = run_cli(capsys, "--checkpoint", run_folder, *pictures, "--output", output, "--class", "cue")
    assert code == 0 and err == []
    results = [json.loads(line) for line in out]
    assert [r["file"] for r in results] == [str(p) for p in pictures]
    assert [r["predicted"]["class"] for r in results] == ["cue", "plain"]
    assert all(r["explained"]["class"] == "cue" and r["explained"]["index"] == 1 for r in results)
    assert sorted(output.iterdir()) == [output / "cue.gradcam.png", output / "plain.gradcam.png"]
    with Image.open(results[0]["output"]) as written:
        assert written.mode == "RGB" and written.size == (SIZE, SIZE)
        pixels = np.asarray(written).astype(int)
    # The image as the model saw it under the heatmap the API gives, which is hottest in the cue's quadrant.
    loaded = load_model(run_folder)
    tensor = preprocess_file(loaded, pictures[0])
    heatmaps, _ = grad_cam(loaded.model, tensor[None], 1)
    expected = np.asarray(overlay(model_pixels(loaded, tensor), heatmaps[0])).astype(int)
    assert np.abs(pixels - expected).max() <= 1
    hottest = np.unravel_index(np.argmax(pixels[..., 0] - pixels[..., 2]), (SIZE, SIZE))  # jet: red high, blue low
    assert hottest[0] < HALF and hottest[1] < HALF


def test_cli_class_by_index_and_predicted_class(run_folder: Path, pictures: list[Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(capsys, "--checkpoint", run_folder, pictures[0], "--output", tmp_path / "a", "--class", "1")
    assert code == 0 and json.loads(out[0])["explained"]["class"] == "cue"
    code, out, _ = run_cli(capsys, "--checkpoint", run_folder, *pictures, "--output", tmp_path / "b", "--stage", "1")
    assert code == 0
    assert [json.loads(line)["explained"]["class"] for line in out] == ["cue", "plain"]


def test_cli_reports_an_unreadable_image_and_explains_the_others(run_folder: Path, pictures: list[Path],
                                                                 tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    output = tmp_path / "cams"
    code, out, err = run_cli(capsys, "--checkpoint", run_folder, pictures[0], broken, pictures[1], "--output", output)
    assert code == 1
    results = [json.loads(line) for line in out]
    assert "error" in results[1] and str(broken) in results[1]["error"]
    assert len(err) == 1 and str(broken) in err[0]
    assert sorted(output.iterdir()) == [output / "cue.gradcam.png", output / "plain.gradcam.png"]


@pytest.mark.parametrize(("option", "message"), [
    (("--class", "dog"), "unknown class 'dog': the model's classes are plain, cue"),
    (("--class", "7"), "class index 7 is out of range: the model has 2 classes"),
    (("--stage", "3"), "stage 3 is out of range: this model has 3 feature maps"),
])
def test_cli_refuses_a_bad_class_or_stage_in_one_line(run_folder: Path, pictures: list[Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture, option: tuple[str, str],
                                                      message: str) -> None:
    code, out, err = run_cli(capsys, "--checkpoint", run_folder, *pictures, "--output", tmp_path / "cams", *option)
    assert code == 2 and out == []
    assert len(err) == 1 and err[0].startswith("xception explain: error: ") and message in err[0]
    assert not (tmp_path / "cams").exists()


def test_explain_files_numbers_outputs_of_the_same_name(run_folder: Path, pictures: list[Path],
                                                        tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    again = write_png(other / "cue.png", cue_images(1, torch.Generator().manual_seed(7), True)[0])
    results = explain_files(load_model(run_folder), [pictures[0], again], tmp_path / "cams")
    assert [Path(r["output"]).name for r in results] == ["cue.gradcam.png", "cue-2.gradcam.png"]
