"""``xception.experiments.definitions``: the settings presets and the command they quote, the data check, and the
variants with their parameter budgets."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from experiment_samples import COLOUR, FASHION, colour_folder

import xception
from xception import experiments
from xception.experiments import ExperimentSettings
from xception.training.recipes import get_recipe


def test_settings_presets_and_the_command_line():
    assert experiments.make_settings() == experiments.FULL
    quick = experiments.make_settings(quick=True)
    assert quick == experiments.QUICK
    assert quick.seeds == 1 and quick.quick and quick.train_subset and quick.val_subset
    assert experiments.make_settings(quick=True, seeds=2).seeds == 2  # an explicit count wins
    assert experiments.command_line("all", quick) == "xception experiment all --quick"
    assert experiments.command_line("order", replace(experiments.FULL, seeds=5), "out") == \
        "xception experiment order --seeds 5 --output out"
    assert experiments.command_line("order", replace(experiments.FULL, batch_size=8)).endswith("Python API)")
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        ExperimentSettings(seeds=0)


def test_too_small_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"training split gives 100 images \(a subset of 100 requested\)"):
        experiments.describe_data(ExperimentSettings(train_subset=100))
    only_train = colour_folder(tmp_path / "only-train", train=4, val=0)
    with pytest.raises(FileNotFoundError, match="no split folder 'val'"):
        experiments.describe_data(ExperimentSettings(data=str(only_train)))


def test_describe_data_counts_what_the_runs_use(tmp_path):
    root = colour_folder(tmp_path, train=40, val=12)
    info = experiments.describe_data(ExperimentSettings(data=str(root), batch_size=16, train_subset=32))
    assert (info.num_classes, info.in_chans) == (2, 3)
    assert (info.train_images, info.train_available, info.val_images) == (32, 40, 12)


@pytest.mark.parametrize("info", [FASHION, COLOUR], ids=["fashion-mnist", "colour"])
def test_spectrum_variants_keep_the_parameter_budget(info):
    variants = experiments.EXPERIMENTS["spectrum"].variants(info)
    assert [v.options.get("segments") for v in variants] == [1, 4, 16, None]
    assert variants[-1].key == "xception"  # depthwise: the baseline, whose count the others match
    target = experiments.parameter_count(variants[-1], info)
    for variant in variants:
        params = experiments.parameter_count(variant, info)
        assert abs(params - target) / target < 0.02, (variant.key, params, target)
    dense = variants[0].options
    assert dense["entry_widths"][0] < get_recipe("compact").model_options["entry_widths"][0]  # denser, narrower
    assert "widths" in variants[1].note


def test_variants_differ_only_in_their_knob():
    keys = {name: [v.key for v in experiments.EXPERIMENTS[name].variants(FASHION)]
            for name in ("activation", "residual", "order")}
    assert keys == {"activation": ["xception", "mid-relu", "mid-elu"], "residual": ["xception", "no-residual"],
                    "order": ["xception", "pointwise-first"]}
    relu = experiments.EXPERIMENTS["activation"].variants(FASHION)[1]
    model, options = experiments.model_options(relu)
    assert model == "xception" and options == {**get_recipe("compact").model_options, "mid_activation": "relu"}


def test_inception_baseline_matches_the_budget_and_round_trips(tmp_path):
    baseline_params, inception_params = (experiments.parameter_count(v, FASHION)
                                         for v in experiments.EXPERIMENTS["inception"].variants(FASHION))
    assert abs(inception_params - baseline_params) / baseline_params < 0.02
    assert "inception_v3_compact" not in xception.list_models()  # a baseline, not of the family
    model = xception.create_model("inception_v3_compact", num_classes=5, in_chans=3, drop_rate=0.1).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    path = xception.save_weights(model, tmp_path / "inception.safetensors")
    again = xception.create_model("inception_v3_compact", weights=path, **model.architecture()).eval()
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(again(x), model(x))
    with pytest.raises(TypeError, match="unknown inception_v3_compact option"):
        xception.create_model("inception_v3_compact", middle_repeats=2)
    with pytest.raises(ValueError, match="no feature-map API"):
        xception.create_model("inception_v3_compact", features_only=True)


def test_another_model_does_not_take_the_recipes_architecture_options():
    assert get_recipe("compact", model="inception_v3_compact").model_options == {}
    assert get_recipe("compact", model="xception").model_options == get_recipe("compact").model_options
