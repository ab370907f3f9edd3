"""``xception.experiments.verdicts``: the noise a gap must exceed, and the verdicts each experiment draws from the
numbers (results made up, nothing trains)."""

from __future__ import annotations

from dataclasses import replace

from experiment_samples import FASHION, variant

from xception.experiments import ExperimentSettings, judge_experiment

SETTINGS = ExperimentSettings()  # three seeds: outcomes are not marked tentative


def test_noise_is_the_seed_spread_or_the_sampling_error():
    spread = [variant("xception", [0.90, 0.91, 0.92]), variant("pointwise-first", [0.80, 0.80, 0.80])]
    assert "against a noise level of 1.00:" in judge_experiment("order", spread, SETTINGS, FASHION).text
    # One seed each: only the sampling error of two accuracies on 1000 images, sqrt((0.9 * 0.1 + 0.8 * 0.2) / 1000).
    single = [variant("xception", [0.90]), variant("pointwise-first", [0.80])]
    assert "against a noise level of 1.58:" in judge_experiment("order", single, SETTINGS,
                                                                replace(FASHION, val_images=1000)).text
    # The same one-point gap is noise on 1000 validation images and a difference on 10,000.
    close = [variant("xception", [0.90]), variant("pointwise-first", [0.89])]
    assert judge_experiment("order", close, SETTINGS, replace(FASHION, val_images=1000)).outcome == "held"
    assert judge_experiment("order", close, SETTINGS, FASHION).outcome == "not held"


def test_activation_verdicts_follow_the_numbers():
    def judge(none, relu, elu):
        verdict = judge_experiment("activation", [variant("xception", none, "none"), variant("mid-relu", relu, "ReLU"),
                                                  variant("mid-elu", elu, "ELU")], SETTINGS, FASHION)
        return verdict.outcome, verdict.text

    outcome, text = judge([0.91, 0.912, 0.914], [0.88, 0.881, 0.882], [0.89, 0.891, 0.892])
    assert outcome == "held" and text.startswith("None ends best: 91.20% against 89.10% for the next best (ELU)")
    assert "ELU ends above ReLU" in text
    outcome, text = judge([0.88, 0.881, 0.882], [0.91, 0.912, 0.914], [0.89, 0.891, 0.892])
    assert outcome == "not held" and text.startswith("ReLU beats none")
    outcome, text = judge([0.900, 0.910, 0.920], [0.899, 0.909, 0.919], [0.85, 0.85, 0.85])
    assert outcome == "inconclusive" and "within the noise" in text


def test_residual_order_spectrum_and_inception_verdicts():
    verdict = judge_experiment("residual", [variant("xception", [0.9, 0.9]), variant("no-residual", [0.8, 0.8])],
                               SETTINGS, FASHION)
    assert verdict.outcome == "held" and "at the first evaluation (step 50)" in verdict.text

    order = [variant("xception", [0.900, 0.905, 0.910]), variant("pointwise-first", [0.902, 0.904, 0.906])]
    assert judge_experiment("order", order, SETTINGS, FASHION).outcome == "held"
    order = [variant("xception", [0.80, 0.80, 0.80]), variant("pointwise-first", [0.90, 0.90, 0.90])]
    assert judge_experiment("order", order, SETTINGS, FASHION).outcome == "not held"

    spectrum = [variant("segments-1", [0.85] * 3, "1 segment"), variant("segments-4", [0.91] * 3, "4 segments"),
                variant("segments-16", [0.909] * 3, "16 segments"), variant("xception", [0.88] * 3, "depthwise")]
    verdict = judge_experiment("spectrum", spectrum, SETTINGS, FASHION)
    assert verdict.outcome == "finding" and verdict.text.startswith("Best: 4 segments; within its noise: 16 segments")
    assert "below the best beyond the noise" in verdict.text

    full_size = {"batch_size": 8, "speed_ratio": 0.8,
                 "rows": [{"network": "xception", "params": 22_855_952, "steps_per_s": 0.4, "skipped": None},
                          {"network": "torchvision inception_v3", "params": 23_834_568, "steps_per_s": 0.5,
                           "skipped": None}]}
    verdict = judge_experiment("inception", [variant("xception", [0.85]), variant("inception", [0.90])],
                               replace(SETTINGS, seeds=1), FASHION, full_size)
    assert verdict.outcome == "not held (one seed: tentative)"
    assert "Xception trains at 0.80x Inception V3's speed" in verdict.text


def test_caveats_give_the_scale_and_the_experiments_own_limits():
    order = [variant("xception", [0.90]), variant("pointwise-first", [0.89], params=1014)]
    caveats = judge_experiment("order", order, ExperimentSettings(seeds=1, epochs=2, quick=True), FASHION).caveats
    assert caveats.startswith("Small scale: Fashion-MNIST (28x28 grayscale), 60,000 training and 10,000 validation "
                              "images, a network of about 1,000 parameters trained for 2 epochs with 1 seed;")
    assert "One seed: the noise level is only the validation set's sampling error" in caveats
    assert "Quick run:" in caveats and caveats.endswith("the widths are not rematched.")
