"""``xception segment train|eval|predict``: the flags come from TrainConfig, eval reports mIoU and per-class IoU by
name as JSON with a confusion PNG, predict writes a colour-coded mask and an overlay per image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from segmentation_samples import CLASSES, write_segmentation_folder

from xception.cli import build_parser, main, parse_options
from xception.data.segmentation import SCALE_RANGE
from xception.inference_segmentation import CAMVID_COLOURS, TTA_SCALES, palette_for, voc_palette
from xception.precision import choose_precision
from xception.training.config import config_from_args

TINY = {"stem_widths": (8, 16), "stem_padding": "same", "entry_widths": (16, 32), "middle_repeats": 0,
        "exit_widths": (32, 48), "tail_widths": (48, 64), "aspp_channels": 16, "decoder_channels": 16,
        "low_level_channels": 8, "input_scale": 1.0}  # the camvid recipe's half resolution would need larger images
TINY_ARGS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("segment-cli")
    data = write_segmentation_folder(root / "data", train=16, val=4, size=(48, 64))
    output = root / "run"
    assert main(["segment", "train", "--data", str(data), "--output", str(output), *TINY_ARGS, "--epochs", "1",
                 "--batch-size", "8", "--crop-size", "48", "--precision", "fp32", "--lr", "0.2"]) == 0
    return data, output


def test_train_prints_where_everything_is(run, capsys) -> None:
    data, output = run
    assert (output / "best.safetensors").is_file() and (output / "curves.png").is_file()
    # A finished run resumed has nothing left to do, and says what it has.
    assert main(["segment", "train", "--data", str(data), "--output", str(output), *TINY_ARGS, "--epochs", "1",
                 "--batch-size", "8", "--crop-size", "48", "--precision", "fp32", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "val mIoU" in out and "best mIoU" in out and str(output / "best.safetensors") in out


def test_eval_json_has_miou_pixel_accuracy_and_per_class_iou_by_name(run, capsys) -> None:
    data, output = run
    assert main(["segment", "eval", "--checkpoint", str(output), "--data", str(data), "--json"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out.strip().splitlines()[-1])
    assert {"miou", "pixel_accuracy", "per_class_iou", "loss", "images", "confusion_png", "tta"} <= set(metrics)
    assert list(metrics["per_class_iou"]) == list(CLASSES) and metrics["images"] == 4 and not metrics["tta"]
    assert 0 <= metrics["miou"] <= 1 and 0 <= metrics["pixel_accuracy"] <= 1
    assert Path(metrics["confusion_png"]) == output / "confusion-val.png" and (output / "confusion-val.png").is_file()
    assert "box" in out and "mIoU" in out
    assert main(["segment", "eval", "--checkpoint", str(output / "best.safetensors"), "--data", str(data), "--json",
                 "--tta", "--output", str(output / "tta")]) == 0
    with_tta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert with_tta["tta"] and 0 <= with_tta["miou"] <= 1 and (output / "tta" / "confusion-val.png").is_file()


def test_tta_views_are_scales_the_network_trained_on() -> None:
    """--tta's scales are DeepLab's evaluation scales: the image as it is among them, and every one inside the
    training's random scale range, so that no view shows the network objects at a size it never learnt."""
    low, high = SCALE_RANGE
    assert 1.0 in TTA_SCALES and all(low <= scale <= high for scale in TTA_SCALES)
    assert tuple(sorted(set(TTA_SCALES))) == TTA_SCALES and len(TTA_SCALES) > 1


def test_tta_help_names_the_scales_used(capsys) -> None:
    """The CLI writes the scales out (to import no torch at start-up); they must be TTA_SCALES."""
    with pytest.raises(SystemExit):
        main(["segment", "eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    *others, last = (f"{scale:g}" for scale in TTA_SCALES)
    assert f"scales {', '.join(others)} and {last} and their mirror images" in help_text


def test_predict_writes_a_mask_and_an_overlay_per_image(run, tmp_path: Path, capsys) -> None:
    data, output = run
    images = tmp_path / "images"
    images.mkdir()
    for name in ("val000.png", "val001.png"):
        (images / name).write_bytes((data / "val" / "images" / name).read_bytes())
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(images / "odd size.jpg")  # any size
    (images / "broken.png").write_text("not an image")
    code = main(["segment", "predict", "--checkpoint", str(output), str(images), "--output", str(tmp_path / "out"),
                 "--json"])
    results = {Path(r["file"]).name: r for r in map(json.loads, capsys.readouterr().out.strip().splitlines())}
    assert code == 1 and "error" in results["broken.png"]  # the others are still predicted
    palette = {tuple(colour) for colour in palette_for(list(CLASSES))}
    for name, size in (("val000.png", (64, 48)), ("odd size.jpg", (50, 40))):
        mask, overlay = Image.open(results[name]["mask"]), Image.open(results[name]["overlay"])
        assert mask.size == overlay.size == size and mask.mode == overlay.mode == "RGB"
        assert {tuple(c) for c in np.asarray(mask).reshape(-1, 3)} <= palette
        assert sum(results[name]["classes"].values()) == pytest.approx(1, abs=1e-3)
    assert Path(results["val000.png"]["mask"]) == tmp_path / "out" / "val000.mask.png"
    assert not list((tmp_path / "out").glob("*.tmp"))  # written atomically, nothing left behind


def test_deploy_a_segmentation_run_and_predict_with_it(run, tmp_path: Path, capsys) -> None:
    """xception deploy judges a segmentation model by its mIoU on the val labels against fp32's (ONNX and OpenVINO
    keep the height and width dynamic); segment predict --deployed then draws the same masks as the run, at a size
    it was not deployed at too."""
    data, output = run
    deployed = tmp_path / "deployed"
    assert main(["deploy", "--checkpoint", str(output), "--calibration", str(data), "--batch-size", "2",
                 "--candidates", "onnxruntime fp32,onnxruntime int8,openvino fp32", "--repeats", "1",
                 "--output", str(deployed), "--json"]) == 0
    rows = {row["candidate"]: row for row in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["candidates"]}
    for name in ("onnxruntime fp32", "openvino fp32"):
        assert rows[name]["status"] in ("chosen", "accepted")
        assert rows[name]["miou"] == pytest.approx(rows[name]["reference_miou"], abs=1e-6)
    assert rows["onnxruntime int8"]["status"] in ("chosen", "accepted", "rejected")  # judged by mIoU, either way
    assert "miou" in rows["onnxruntime int8"] and 0 <= rows["onnxruntime int8"]["agreement"] <= 1
    record = json.loads((deployed / "deploy.json").read_text())
    assert record["task"] == "segmentation" and record["classes"] == list(CLASSES)
    assert record["artifact"]["input_size"] is None  # any height and width

    images = tmp_path / "images"
    images.mkdir()
    (images / "val000.png").write_bytes((data / "val" / "images" / "val000.png").read_bytes())
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)).save(images / "odd.png")
    masks = {}
    for source in (["--checkpoint", str(output)], ["--deployed", str(deployed)]):
        assert main(["segment", "predict", *source, str(images), "--output", str(tmp_path / source[0]),
                     "--precision", "fp32", "--json"]) == 0
        results = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
        masks[source[0]] = [np.asarray(Image.open(result["mask"])) for result in results]
    if record["artifact"]["precision"] == "fp32":
        for before, after in zip(masks["--checkpoint"], masks["--deployed"], strict=True):
            assert (before == after).mean() > 0.999
    assert main(["segment", "predict", str(images), "--output", str(tmp_path / "x")]) == 2
    assert "give either --checkpoint RUN or --deployed DIR" in capsys.readouterr().err


def test_palettes() -> None:
    """CamVid's colours by name where the classes are CamVid's; otherwise PASCAL VOC's colour map, whose first
    entries are black, dark red, dark green, olive, navy (the VOC devkit's labelcolormap)."""
    camvid = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian",
              "bicyclist"]
    assert [tuple(c) for c in palette_for(camvid)] == [CAMVID_COLOURS[name] for name in camvid]
    assert [tuple(c) for c in voc_palette(6)] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128),
                                                  (128, 0, 128)]
    assert len({tuple(c) for c in voc_palette(21)}) == 21


def test_every_segment_train_flag_reaches_train_config() -> None:
    argv = ["segment", "train", "--data", "folder", "--output", "out", "--recipe", "camvid", "--model",
            "deeplabv3_xception65", "--set", "aspp_channels=64", "--epochs", "3", "--batch-size", "4", "--lr", "0.01",
            "--crop-size", "256", "--backbone-weights", "tf_in1k", "--output-stride", "8", "--ignore-index", "254",
            "--class-weights", "median-frequency", "--augment", "basic", "--scale-range", "0.75", "1.5", "--resume",
            "--deterministic", "--precision", "bf16", "--max-minutes", "30", "--train-subset", "10",
            "--label-smoothing", "0.1", "--weights", "runs/camvid", "--lovasz-weight", "0.5", "--label-stride", "2"]
    args = build_parser().parse_args(argv)
    config = config_from_args(args, parse_options(args.model_options), task="segmentation")
    assert (config.task, config.data, config.model, config.model_options) == (
        "segmentation", "folder", "deeplabv3_xception65", {"aspp_channels": 64})
    assert (config.img_size, config.backbone_weights, config.output_stride, config.ignore_index) == (
        256, "tf_in1k", 8, 254)
    assert (config.class_weights, config.augmentation, config.resume, config.max_minutes, config.weights) == (
        "median-frequency", "basic", True, 30, "runs/camvid")
    assert config.scale_range == (0.75, 1.5) and config.resolved_recipe().scale_range == (0.75, 1.5)
    assert (config.lovasz_weight, config.label_stride) == (0.5, 2)
    assert (config.resolved_recipe().lovasz_weight, config.resolved_recipe().label_stride) == (0.5, 2)


def test_segment_train_help_lists_the_segmentation_flags_only(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["segment", "train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--crop-size", "--backbone-weights", "--weights ", "--output-stride", "--ignore-index",
                 "--class-weights", "--resume", "--max-minutes", "deeplabv3plus_xception65"):
        assert flag in out, flag
    for flag in ("--img-size", "--mixup", "--classes", "--layer-decay", "--drop-rate"):
        assert flag not in out, flag


@pytest.mark.parametrize(("argv", "message"), [
    (["segment", "train", "--output", "out"], "the following arguments are required: --data"),
    (["segment", "train", "--data", "d", "--output", "o", "--mixup", "0.2"], "unrecognized arguments: --mixup"),
    (["segment", "train", "--data", "d", "--output", "o", "--recipe", "compact"], "invalid choice: 'compact'"),
    (["segment", "train", "--data", "d", "--output", "o", "--output-stride", "4"], "invalid choice: 4"),
    (["segment", "train", "--data", "d", "--output", "o", "--ignore-index", "256"], "must be <= 255, got 256"),
    (["segment", "train", "--data", "d", "--output", "o", "--model", "xception"], "invalid choice: 'xception'"),
    (["segment", "eval", "--data", "d"], "the following arguments are required: --checkpoint"),
    (["segment", "train", "--data", "d", "--output", "o", "--scale-range", "0.5"], "expected 2 arguments"),
    (["segment", "train", "--data", "d", "--output", "o", "--scale-range", "0", "2"], "must be > 0, got 0.0"),
])
def test_flags_are_checked_where_they_are_parsed(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_bad_data_and_a_classification_checkpoint_are_one_line_errors(run, tmp_path: Path, capsys) -> None:
    data, _ = run
    broken = write_segmentation_folder(tmp_path / "broken", train=2, val=1, size=(48, 64))
    Image.fromarray(np.full((48, 64), 9, np.uint8)).save(broken / "train" / "labels" / "train001.png")
    assert main(["segment", "train", "--data", str(broken), "--output", str(tmp_path / "r"), *TINY_ARGS]) == 2
    *said, error = capsys.readouterr().err.splitlines()  # the precision chosen is said first, then the error
    assert said == [f"{choose_precision('auto').describe()}"]
    assert error.startswith("xception segment: error: label file") and "train001.png holds the values [9]" in error
    assert not (tmp_path / "r" / "last.safetensors").exists()  # refused before any training
    import xception

    backbone_options = ("stem_widths", "stem_padding", "entry_widths", "middle_repeats", "exit_widths", "tail_widths")
    xception.save_weights(xception.create_model("xception", num_classes=3, **{k: v for k, v in TINY.items()
                                                                               if k in backbone_options}),
                          tmp_path / "classifier.safetensors")
    assert main(["segment", "eval", "--checkpoint", str(tmp_path / "classifier.safetensors"), "--data",
                 str(data)]) == 2
    assert "a classification model: use xception eval" in capsys.readouterr().err
