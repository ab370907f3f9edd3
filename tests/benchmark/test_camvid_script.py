"""benchmarks/camvid.py, the recorded CamVid run: its --smoke takes the whole path (train through the library, the
evaluation of ``xception segment eval``, the JSON, both figures, the README table) in seconds on a tiny folder in
CamVid's layout (tests/segmentation_samples.py), and never writes into benchmarks/results."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from segmentation_samples import CLASSES, write_segmentation_folder

from xception.cli import main as xception_main
from xception.hardware import probe
from xception.precision import choose_precision
from xception.training.segmentation import build_segmentation_model

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
RECORDED = ("camvid.json", "camvid_predictions.png", "camvid_curve.png")


@pytest.fixture(scope="module")
def camvid():
    spec = importlib.util.spec_from_file_location("camvid_benchmark", ROOT / "benchmarks" / "camvid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recorded_files() -> dict[str, bytes | None]:
    return {name: (RESULTS / name).read_bytes() if (RESULTS / name).exists() else None for name in RECORDED}


def test_smoke_run_end_to_end(camvid, tmp_path, one_thread, capsys):
    before = recorded_files()
    # 176x184: --tta's scales from 0.75 up (132 pixels at 0.75) stay above the model's minimum input, 130 at
    # input_scale 0.5; its 0.5 is left out
    data = write_segmentation_folder(tmp_path / "scenes", train=6, val=3, size=(176, 184))
    run = tmp_path / "run"
    assert camvid.main(["--smoke", "--data", str(data), "--output", str(run), "--tta"]) == 0
    printed = capsys.readouterr().out
    assert recorded_files() == before  # the recorded run's files are untouched

    results = run / "results"
    result = json.loads((results / "camvid.json").read_text())
    assert result["command"] == f"python benchmarks/camvid.py --smoke --data {data} --output {run} --tta"
    assert result["smoke"] and result["recipe"]["name"] == "camvid" and result["recipe"]["img_size"] == 136
    assert (result["steps"], result["epochs"], result["stopped"], result["checkpoint"]) == (4, 2, "finished", "best")
    assert result["date"] and result["machine"] == probe().line() and result["parameters"] > 1_000_000
    assert result["precision"] == choose_precision("auto").to_json()  # what the run chose, and why
    assert [point["epoch"] for point in result["curve"]] == [1, 2]
    assert 0 < result["curve"][0]["minutes"] < result["curve"][1]["minutes"] <= result["minutes"]
    assert result["best_epoch"] in (1, 2) and result["curve_precision"] == choose_precision("auto").name
    assert result["schedule_plan"]["epochs"] == 2  # --max-minutes' 30 minutes hold the smoke run's 2 epochs
    assert list(result["per_class_iou"]) == list(CLASSES) == list(result["tta"]["per_class_iou"])
    assert result["images"] == 3 and 0 <= result["miou"] <= 1 and 0 <= result["tta"]["miou"] <= 1
    assert result["tta"]["scales"] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]  # the scales asked for (0.5 left out here)

    # The numbers are those `xception segment eval` reports for the same run.
    assert xception_main(["segment", "eval", "--checkpoint", str(run), "--data", str(data), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["miou"] == pytest.approx(result["miou"], abs=1e-9)
    assert evaluated["per_class_iou"] == result["per_class_iou"]

    with Image.open(results / "camvid_predictions.png") as figure:
        assert figure.size == (1200, 960)  # 3 rows (images) of image, ground truth, prediction
    with Image.open(results / "camvid_curve.png") as figure:
        assert figure.size == (700, 400)
    assert "| class | IoU (val, 480x360) | with flip and multi-scale |" in printed
    for name in CLASSES:
        assert f"| {name} | " in printed
    assert f"| **mIoU** | {100 * result['miou']:.1f} | {100 * result['tta']['miou']:.1f} |" in printed

    # --compare reads the file just written: the flags without the paths, the recipe's loss, the two epochs and
    # their mean.
    assert camvid.main(["--compare", str(results / "camvid.json")]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    steady = 100 * (result["curve"][0]["miou"] + result["curve"][1]["miou"]) / 2
    assert row.startswith(f"| `--smoke --tta` | adamw 0.001 at batch 2 | cross-entropy + 1 x Lovász, label stride 4 "
                          f"| 2 | {100 * result['miou']:.1f}% ({result['best_epoch']}) | "
                          f"{100 * result['tta']['miou']:.1f}% (0.5-1.75) | ")
    assert row.endswith(f"| {steady:.1f}% | {result['minutes']:.1f} |")


def test_compare_takes_the_mean_of_the_last_ten_epochs_and_drops_the_paths(camvid):
    """The result below has the fields --compare reads, named as camvid.main writes them (the smoke test above
    feeds --compare a file that main wrote); the curve is made up so that the mean can be checked by hand."""
    curve = [{"epoch": epoch, "miou": epoch / 100} for epoch in range(1, 13)]  # 0.01 ... 0.12
    result = {"command": "python benchmarks/camvid.py --output runs/x --set 'atrous_rates=(3, 6, 9)' --results r "
                         "--tta --data d", "recipe": {"optimizer": "sgd", "lr": 0.05, "batch_size": 4,
                                                   "reference_batch_size": 8}, "miou": 0.125,
              "best_epoch": 12, "tta": None, "minutes": 29.96, "curve": curve}
    assert camvid.last_epochs_mean(result) == pytest.approx(0.075)  # epochs 3-12
    assert camvid.variant_flags(result["command"]) == "`--set 'atrous_rates=(3, 6, 9)' --tta`"
    assert camvid.variant_flags("python benchmarks/camvid.py --output runs/camvid") == "none"
    # A run recorded before the recipe had a Lovász term (no such fields): cross-entropy on every pixel.
    assert camvid.compare_table([result]).splitlines()[-1] == (
        "| `--set 'atrous_rates=(3, 6, 9)' --tta` | sgd 0.025 at batch 4 | cross-entropy | 12 | 12.5% (12) | n/a | "
        "7.5% | 30.0 |")
    result["recipe"].update(lovasz_weight=1.0, label_stride=4)
    assert "| cross-entropy + 1 x Lovász, label stride 4 | 12 |" in camvid.compare_table([result])
    # --tta's scales: a record that names none was evaluated at 0.75, 1 and 1.25, the scales of its time.
    result["tta"] = {"miou": 0.2}
    assert "| 12.5% (12) | 20.0% (0.75-1.25) |" in camvid.compare_table([result])
    result["tta"]["scales"] = [0.5, 1.0, 2.0]
    assert "| 12.5% (12) | 20.0% (0.5-2) |" in camvid.compare_table([result])


def test_an_output_holding_a_run_is_refused_before_training(camvid, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="already holds a run"):
        camvid.main(["--smoke", "--data", str(tmp_path / "missing"), "--output", str(run)])


def test_the_recorded_runs_commands_become_their_training_configs(camvid, tmp_path):
    """The recorded run takes the camvid recipe as it is; --class-weights (the median-frequency record) changes
    only the loss's class weights, --augmentation only the augmentation, --batch-size and --lr, --lovasz-weight and
    --label-stride only those."""
    plain = camvid.training_config(camvid.parse_args(["--output", str(tmp_path / "a")])).resolved_recipe()
    weighted = camvid.training_config(camvid.parse_args(["--output", str(tmp_path / "b"), "--class-weights",
                                                         "median-frequency"])).resolved_recipe()
    assert plain.class_weights is None and weighted.class_weights == "median-frequency"
    assert weighted == dataclasses.replace(plain, class_weights="median-frequency")
    for flag in ("--augment", "--augmentation"):  # segment train's spelling, and the recorded commands'
        basic = camvid.training_config(camvid.parse_args(["--output", str(tmp_path / "c"), flag,
                                                          "basic"])).resolved_recipe()
        assert basic == dataclasses.replace(plain, augmentation="basic")
    assert plain.model_options["input_scale"] == 0.5 and plain.img_size == 448
    smaller = camvid.training_config(camvid.parse_args(["--output", str(tmp_path / "d"), "--batch-size", "4",
                                                        "--lr", "0.004"])).resolved_recipe()
    assert smaller == dataclasses.replace(plain, batch_size=4, lr=0.004)
    loss = camvid.training_config(camvid.parse_args(["--output", str(tmp_path / "e"), "--lovasz-weight", "0",
                                                     "--label-stride", "1"])).resolved_recipe()
    assert loss == dataclasses.replace(plain, lovasz_weight=0.0, label_stride=1)
    with pytest.raises(SystemExit):
        camvid.parse_args(["--label-stride", "0"])


def test_set_passes_architecture_options_on_top_of_the_recipes(camvid, tmp_path):
    """--set is how the recipe variants named in the README (ASPP rates, input scale) are rerun: the options
    reach the model that is built, the recipe's other options and fields stay."""
    args = camvid.parse_args(["--output", str(tmp_path / "a"), "--set", "input_scale=0.75",
                              "--set", "atrous_rates=(3, 6, 9)"])
    config = camvid.training_config(args)
    recipe = config.resolved_recipe()
    assert recipe == camvid.training_config(camvid.parse_args(["--output", str(tmp_path / "b")])).resolved_recipe()
    model = build_segmentation_model(config, recipe, num_classes=len(CLASSES), in_chans=3)
    assert model.input_scale == 0.75 and model.min_input_size == 87  # ceil(65 / 0.75): 65 at full scale
    dilations = [[m.dilation for m in branch.modules() if getattr(m, "kernel_size", None) == (3, 3)]
                 for branch in model.aspp.atrous]
    assert dilations == [[(3, 3)], [(6, 6)], [(9, 9)]]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        camvid.training_config(camvid.parse_args(["--output", str(tmp_path / "c"), "--set", "input_scale"]))


def test_resolution_ceiling_loses_thin_classes_first(camvid, tmp_path, capsys):
    """A 64x64 label map: class 1 a 2-pixel-wide vertical line, class 2 a 32x32 block on the 16-pixel grid, a
    row of ignored pixels. At stride 1 every class is exact; at stride 16 no cell holds more line than
    background, so the line is never predicted, while the block loses at most its blurred border."""
    data = write_segmentation_folder(tmp_path / "scenes", train=1, val=1, size=(64, 64))
    label = np.zeros((64, 64), np.uint8)
    label[:, 40:42] = 1
    label[16:48, 0:32] = 2
    label[0, :] = 255
    Image.fromarray(label).save(data / "val" / "labels" / "val000.png")

    ceilings = camvid.resolution_ceiling(data, [1, 16])
    assert ceilings[1]["per_class_iou"] == {"background": 1.0, "box": 1.0, "square": 1.0}
    assert ceilings[1]["miou"] == 1.0
    coarse = ceilings[16]["per_class_iou"]
    assert coarse["box"] == 0.0 and coarse["square"] > 0.8 and coarse["background"] > 0.8

    assert camvid.main(["--ceiling", "1", "16", "--data", str(data)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "| scores at stride | background | box | square | mIoU |"
    assert printed[2] == "| 1 | 100.0 | 100.0 | 100.0 | 100.0 |"
    assert printed[3].startswith("| 16 | ") and "| 0.0 |" in printed[3]
    with pytest.raises(SystemExit):
        camvid.main(["--ceiling", "0", "--data", str(data)])
    assert "argument --ceiling: must be >= 1, got 0" in capsys.readouterr().err
