"""Exactness against the author's Keras code: keras.applications.Xception on the PyTorch backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import relative_error
from keras_reference import (
    keras_features_model,
    keras_logits,
    random_keras_xception,
    rewrite_as_keras1,
    save_keras3_h5,
)

import xception

TOLERANCE = 2e-5
SIZES = [(299, 299), (71, 71), (240, 320)]


@pytest.fixture(scope="module")
def keras_model():
    return random_keras_xception(seed=1)


@pytest.fixture(scope="module")
def weight_files(keras_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras")
    keras3 = save_keras3_h5(keras_model, folder / "keras3.h5")
    keras1 = rewrite_as_keras1(keras3, folder / "keras1.h5")
    return {"keras3": keras3, "keras1": keras1}


def images(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (2, *size, 3)).astype("float32")


def torch_logits(model: torch.nn.Module, nhwc: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(nhwc).permute(0, 3, 1, 2))


@pytest.mark.parametrize("layout", ["keras3", "keras1"])
def test_logits_match_keras(keras_model, weight_files, layout):
    model = xception.create_model("xception", weights=weight_files[layout]).eval()
    for size in SIZES:
        x = images(size)
        expected = keras_logits(keras_model, x)
        actual = torch_logits(model, x)
        assert relative_error(actual, expected) <= TOLERANCE, size
        # The check has teeth: the two images give clearly different logits.
        assert relative_error(expected[0], expected[1]) > 100 * TOLERANCE


def test_keras1_layout_really_differs(weight_files):
    import h5py

    with h5py.File(weight_files["keras1"]) as f:
        names = [str(n, "utf-8") if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
        last_bn_weight = f["block1_conv1_bn"].attrs["weight_names"][3]
    assert last_bn_weight in (b"block1_conv1_bn_running_std:0", "block1_conv1_bn_running_std:0")
    # Keras 1 stored a block's shortcut after its separable convolutions.
    assert names.index("convolution2d_1") > names.index("block2_sepconv2_bn")


def test_timm_numerics_do_not_match_keras(keras_model, weight_files):
    """The symmetric pooling and BN eps of the popular port are measurably off the reference."""
    model = xception.create_model("xception", weights=weight_files["keras3"], numerics="timm").eval()
    x = images((240, 320))
    assert relative_error(torch_logits(model, x), keras_logits(keras_model, x)) > 100 * TOLERANCE


def test_notop_file_matches_keras_pooled_features(tmp_path):
    keras_notop = random_keras_xception(seed=2, include_top=False)
    path = save_keras3_h5(keras_notop, tmp_path / "notop.h5")
    model = xception.create_model("xception", num_classes=0, weights=path).eval()
    for size in [(299, 299), (240, 320)]:
        x = images(size, seed=3)
        expected = np.asarray(keras_notop(x, training=False).detach().cpu())
        actual = torch_logits(model, x)
        assert actual.shape == (2, 2048)
        assert relative_error(actual, expected) <= TOLERANCE


def test_notop_file_into_model_with_classifier_is_refused(tmp_path):
    keras_notop = keras_features_model(random_keras_xception(seed=2))
    path = save_keras3_h5(keras_notop, tmp_path / "notop.h5")
    model = xception.create_model("xception")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(xception.WeightFileError, match=r"no classifier.*num_classes=0"):
        xception.load_weights(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
