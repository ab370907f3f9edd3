"""``xception experiment decoder``: DeepLabV3+ against DeepLabV3 and the other factors on a segmentation folder. The
variants and their training configs, the settings, the verdict on made-up results, the factor table, and one quick
run end to end on a tiny synthetic folder (tests/segmentation_samples.py: the CamVid layout)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from experiment_samples import variant
from segmentation_samples import CLASSES, write_segmentation_folder

import xception
from xception import experiments
from xception.cli import main
from xception.experiments import (
    SEGMENTATION_FULL,
    SEGMENTATION_QUICK,
    ExperimentSettings,
    SegmentationDataInfo,
    SegmentationSettings,
    judge_experiment,
    runner,
)
from xception.training.recipes import get_recipe

CAMVID = SegmentationDataInfo("camvid", 11, 3, 367, 101, 367, 101, crop_size=320, small_crop_size=240)
KEYS = ["deeplabv3plus", "deeplabv3", "compact-backbone", "output-stride-8", "small-crop"]


def build(v):
    model, options = experiments.model_options(v)
    return xception.create_model(model, num_classes=CAMVID.num_classes, in_chans=3, **options)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_variants_change_one_factor_each():
    variants = experiments.EXPERIMENTS["decoder"].variants(CAMVID)
    assert [v.key for v in variants] == KEYS
    assert [v.fewer_seeds for v in variants] == [False, False, True, True, True]
    configs = {v.key: runner._training_config(v, 0, SEGMENTATION_FULL).resolved_recipe() for v in variants}
    assert {key: (r.task, r.model, r.output_stride, r.img_size) for key, r in configs.items()} == {
        "deeplabv3plus": ("segmentation", "deeplabv3plus_xception", 16, 320),
        "deeplabv3": ("segmentation", "deeplabv3_xception", 16, 320),
        "compact-backbone": ("segmentation", "deeplabv3plus_xception", 16, 320),
        "output-stride-8": ("segmentation", "deeplabv3plus_xception", 8, 320),
        "small-crop": ("segmentation", "deeplabv3plus_xception", 16, 240)}
    # The optimizer, batch and loss of the recorded runs (SGD, 0.05 at batches of 8, cross-entropy on every pixel);
    # the recipe has moved to AdamW in batches of 4 with a Lovász term on a label grid.
    assert {(r.optimizer, r.momentum, r.batch_size) for r in configs.values()} == {("sgd", 0.9, 8)}
    assert {(r.lovasz_weight, r.label_stride) for r in configs.values()} == {(0.0, 1)}
    assert all(r.lr * r.batch_size / r.reference_batch_size == pytest.approx(0.05) for r in configs.values())
    # The camvid recipe's network, at full resolution as recorded (the recipe itself runs it at half).
    narrow = {**get_recipe("camvid").model_options, "input_scale": 1.0}
    options = {v.key: experiments.model_options(v)[1] for v in variants}
    assert options["deeplabv3plus"] == options["deeplabv3"] == options["output-stride-8"] == narrow
    assert options["small-crop"] == narrow
    assert options["compact-backbone"] == {**get_recipe("compact").model_options, "stem_stride": 2,
                                           "input_scale": 1.0}
    assert all(build(v).input_scale == 1.0 for v in variants)
    # Every variant has runs of its own, and the same variant the same folder.
    folders = {runner._run_folder(v, 0, SEGMENTATION_FULL, Path("out")) for v in variants}
    assert len(folders) == 5
    assert runner._run_folder(variants[0], 0, SEGMENTATION_FULL, Path("out")) in folders


def test_the_decoder_variant_has_no_decoder_and_the_parameter_counts_follow(one_thread):
    variants = dict(zip(KEYS, experiments.EXPERIMENTS["decoder"].variants(CAMVID), strict=True))
    plus, v3, compact = (build(variants[key]) for key in ("deeplabv3plus", "deeplabv3", "compact-backbone"))
    assert plus.decoder is not None and v3.decoder is None
    assert count(plus.backbone) == count(v3.backbone)
    assert count(plus) - count(v3) == count(plus.decoder)  # both classifiers take 256 channels
    params = {key: experiments.parameter_count(v, CAMVID) for key, v in variants.items()}
    assert params["deeplabv3plus"] == count(plus) and params["deeplabv3"] == count(v3)
    # Stride and crop change no weight; the compact backbone has a sixth of the narrow one's.
    assert params["output-stride-8"] == params["small-crop"] == params["deeplabv3plus"]
    assert count(compact.backbone) * 5 < count(plus.backbone)
    assert [info["reduction"] for info in compact.backbone.feature_info][:2] == [2, 4]  # the decoder's map exists


def test_settings_presets_and_the_command_line():
    assert experiments.make_settings(experiment="decoder") == SEGMENTATION_FULL
    assert SEGMENTATION_FULL.data == "../shared/datasets/camvid" and SEGMENTATION_FULL.crop_size == 320
    quick = experiments.make_settings(experiment="decoder", quick=True, data="/data/scenes")
    assert quick == replace(SEGMENTATION_QUICK, data="/data/scenes")
    five = experiments.make_settings(experiment="decoder", seeds=5)
    assert (five.seeds_for(fewer=False), five.seeds_for(fewer=True)) == (5, 2)
    assert experiments.make_settings(experiment="decoder", seeds=1).seeds_for(fewer=True) == 1
    assert experiments.command_line("decoder", quick) == "xception experiment decoder --data /data/scenes --quick"
    assert experiments.command_line("decoder", replace(SEGMENTATION_FULL, epochs=4), "out") == \
        "xception experiment decoder --epochs 4 --output out"
    assert experiments.command_line("decoder", replace(SEGMENTATION_FULL, crop_size=256)).endswith("Python API)")
    with pytest.raises(ValueError, match="crop 40 variant's crop of 40 pixels is smaller than deeplabv3plus_xception's "
                                         "minimum input of 65"):
        experiments.EXPERIMENTS["decoder"].variants(replace(CAMVID, small_crop_size=40))
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        SegmentationSettings(batch_size=1)


def test_data_and_settings_are_checked_before_training(tmp_path, capsys):
    root = write_segmentation_folder(tmp_path / "scenes", train=6, val=3)
    info = experiments.describe_data(SegmentationSettings(data=str(root), batch_size=4, train_subset=5))
    assert (info.num_classes, info.train_images, info.train_available, info.val_images) == (3, 5, 6, 3)
    with pytest.raises(ValueError, match=r"gives 6 images, fewer than one batch of 8"):
        experiments.describe_data(SegmentationSettings(data=str(root)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        experiments.describe_data(SegmentationSettings(data=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match=r"experiment 'decoder' takes SegmentationSettings"):
        experiments.run_experiments("decoder", ExperimentSettings(), tmp_path / "out")
    with pytest.raises(ValueError, match=r"experiment 'order' takes ExperimentSettings"):
        experiments.run_experiments("order", SEGMENTATION_QUICK, tmp_path / "out")
    assert main(["experiment", "decoder", "--docs", str(tmp_path / "docs"), "--output", str(tmp_path / "out")]) == 2
    assert "decoder's report is" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def decoder_results(plus, v3, factors=(0.50, 0.50, 0.50)):
    return [variant("deeplabv3plus", plus, "DeepLabV3+"), variant("deeplabv3", v3, "DeepLabV3"),
            *(variant(key, [value] * 2, key) for key, value in zip(KEYS[2:], factors, strict=True))]


def test_decoder_verdicts_follow_the_numbers():
    def judge(plus, v3, settings=SEGMENTATION_FULL, **kwargs):
        return judge_experiment("decoder", decoder_results(plus, v3, **kwargs), settings, CAMVID)

    held = judge([0.50, 0.51, 0.52], [0.45, 0.46, 0.47], factors=(0.40, 0.515, 0.50))
    assert held.outcome == "held"
    assert held.text.startswith("DeepLabV3+ ends best: 51.00% against 46.00% for the next best (DeepLabV3), a gap of "
                                "5.00 points against a noise level of 1.00.")
    assert "compact-backbone -11.00 points (beyond the noise of 1.00)" in held.text
    assert "output-stride-8 +0.50 points (within the noise of 1.00)" in held.text
    assert judge([0.45, 0.46, 0.47], [0.50, 0.51, 0.52]).outcome == "not held"
    inconclusive = judge([0.50, 0.53, 0.56], [0.49, 0.52, 0.55])
    assert inconclusive.outcome == "inconclusive" and "within the noise" in inconclusive.text
    # One seed measures no noise: any gap decides, and the outcome says it is tentative.
    assert judge([0.50], [0.49], replace(SEGMENTATION_FULL, seeds=1)).outcome == "held (one seed: tentative)"
    caveats = judge([0.5], [0.4], replace(SEGMENTATION_QUICK, data="camvid")).caveats
    assert caveats.startswith("Small scale: the folder camvid, 367 training and 101 validation images (scored at full "
                              "resolution), a network of about 1,000 parameters trained from scratch for 1 epoch on "
                              "320-pixel crops")
    assert "One seed: no noise is measured" in caveats and "Quick run" in caveats and "seeds' spread only" in caveats


def test_factor_table(tmp_path):
    variants = decoder_results([0.50, 0.52, 0.54], [0.45, 0.46, 0.47], factors=(0.40, 0.55, 0.49))
    variants[2].runs[0].seconds = None  # a resumed run's time is unknown: the mean is over the others
    verdict = judge_experiment("decoder", variants, SEGMENTATION_FULL, CAMVID)
    definition = experiments.EXPERIMENTS["decoder"]
    result = experiments.ExperimentResult(
        name="decoder", title=definition.title, paper=definition.paper, claim=definition.claim,
        settings=asdict(SEGMENTATION_FULL), data=asdict(CAMVID), variants=variants, verdict=verdict, full_size=None,
        machine="test machine", date="2026-01-01", command="xception experiment decoder")
    experiments.write_outputs(result, tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert ("| variant | what changes | parameters | seeds | final val mIoU (mean ± std) | vs baseline | minutes per "
            "run |") in table
    assert "| DeepLabV3+ |  | 1,000 | 3 | 52.00 ± 2.00% | - | 0.17 |" in table
    assert "| DeepLabV3 |  | 1,000 | 3 | 46.00 ± 1.00% | -6.00 | 0.17 |" in table
    assert "| compact-backbone |  | 1,000 | 2 | 40.00 ± 0.00% | -12.00 | 0.17 |" in table
    assert "| output-stride-8 |  | 1,000 | 2 | 55.00 ± 0.00% | +3.00 | 0.17 |" in table
    assert "**Verdict: held.**" in table and (tmp_path / "curves.png").stat().st_size > 0
    assert experiments.ExperimentResult.from_json((tmp_path / "results.json").read_text()) == result


def test_quick_run_end_to_end_on_a_synthetic_folder(tmp_path, one_thread, capsys, monkeypatch):
    root = write_segmentation_folder(tmp_path / "scenes", train=8, val=4, size=(72, 80))  # the model's minimum: 65
    output = tmp_path / "out"
    assert main(["experiment", "decoder", "--quick", "--data", str(root), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("val mIoU") == 5 and "decoder (DeepLabV3+, Tables 3 and 5): " in printed
    result = json.loads((output / "decoder" / "results.json").read_text())
    assert [v["key"] for v in result["variants"]] == KEYS
    assert result["command"] == f"xception experiment decoder --data {root} --quick --output {output}"
    assert result["data"]["crop_size"] == 96 and result["data"]["val_images"] == 4
    for v in result["variants"]:
        [run] = v["runs"]
        assert run["steps"] == 2 and len(run["curve"]) == 1 and 0 <= run["final_top1"] <= 1 and run["seconds"]
        config = json.loads((Path(run["output"]) / "config.json").read_text())
        assert config["task"] == "segmentation" and config["classes"] == list(CLASSES)
    recipes = {v["key"]: json.loads((Path(v["runs"][0]["output"]) / "config.json").read_text())["recipe"]
               for v in result["variants"]}
    assert recipes["output-stride-8"]["output_stride"] == 8 and recipes["small-crop"]["img_size"] == 80
    assert recipes["deeplabv3"]["model"] == "deeplabv3_xception"
    assert result["verdict"]["outcome"] in ("inconclusive", "held (one seed: tentative)",
                                            "not held (one seed: tentative)")
    assert "| compact backbone |" in (output / "decoder" / "results.md").read_text()

    # Finished runs are read back, not trained again.
    monkeypatch.setattr(runner, "train", lambda config: pytest.fail("trained a finished run again"))
    settings = experiments.make_settings(experiment="decoder", quick=True, data=str(root))
    [again] = experiments.run_experiments("decoder", settings, output)
    assert [v.finals for v in again.variants] == [[v["runs"][0]["final_top1"]] for v in result["variants"]]
