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
    save_keras3_h5,
    save_official_layout,
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
    return {"keras3": save_keras3_h5(keras_model, folder / "keras3.h5"),
            "official": save_official_layout(keras_model, folder / "official.h5"),
            # Nothing guarantees where Keras 1's counters stood: the loader must not rely on the numbers.
            "official_shifted": save_official_layout(keras_model, folder / "shifted.h5", first_number=7)}


def images(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (2, *size, 3)).astype("float32")


def text(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name


def torch_logits(model: torch.nn.Module, nhwc: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(nhwc).permute(0, 3, 1, 2))


@pytest.mark.parametrize("layout", ["keras3", "official", "official_shifted"])
def test_logits_match_keras(keras_model, weight_files, layout):
    model = xception.create_model("xception", weights=weight_files[layout]).eval()
    for size in SIZES:
        x = images(size)
        expected = keras_logits(keras_model, x)
        actual = torch_logits(model, x)
        assert relative_error(actual, expected) <= TOLERANCE, size
        # The check has teeth: the two images give clearly different logits.
        assert relative_error(expected[0], expected[1]) > 100 * TOLERANCE


def test_official_layout_fixture_is_what_keras_reads(keras_model, weight_files):
    """The fixture itself: Keras's own positional loader (how Keras 2/3 read the official files) gets back every
    weight, so the renaming lost or reordered nothing."""
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import load_weights_from_hdf5_group

    fresh = random_keras_xception(seed=5)
    with h5py.File(weight_files["official"], "r") as f:
        load_weights_from_hdf5_group(f, fresh)
    for loaded, original in zip(fresh.get_weights(), keras_model.get_weights(), strict=True):
        np.testing.assert_array_equal(loaded, original)


def test_official_layout_is_the_real_files_layout(weight_files):
    """What the real files look like (xception-facts.md, "The official files"), checked on the fixture."""
    import h5py

    with h5py.File(weight_files["official"], "r") as f:
        names = [text(n) for n in f.attrs["layer_names"]]
        weighted = [n for n in names if len(f[n].attrs["weight_names"])]
        assert "keras_version" not in f.attrs and "backend" not in f.attrs
        assert sorted(weighted) == sorted([f"convolution2d_{i}" for i in range(1, 7)]
                                          + [f"separableconvolution2d_{i}" for i in range(1, 35)]
                                          + [f"batchnormalization_{i}" for i in range(1, 41)] + ["dense_2"])
        assert list(f["batchnormalization_3"]) == [f"batchnormalization_3_{w}:0" for w in
                                                   ("beta", "gamma", "running_mean", "running_std")]
        # Block2's shortcut BN was created third, but Keras lists it after block2's separable convolutions.
        assert names.index("batchnormalization_3") > names.index("batchnormalization_5")
        assert f["batchnormalization_3"]["batchnormalization_3_gamma:0"].shape == (128,)
        assert f["convolution2d_6"]["convolution2d_6_W:0"].shape == (1, 1, 728, 1024)
        assert f["batchnormalization_36"]["batchnormalization_36_gamma:0"].shape == (1024,)  # block13's shortcut


def test_timm_numerics_do_not_match_keras(keras_model, weight_files):
    """The symmetric pooling and BN eps of the popular port are measurably off the reference."""
    model = xception.create_model("xception", weights=weight_files["keras3"], numerics="timm").eval()
    x = images((240, 320))
    assert relative_error(torch_logits(model, x), keras_logits(keras_model, x)) > 100 * TOLERANCE


@pytest.mark.parametrize("layout", ["keras3", "official"])
def test_notop_file_matches_keras_pooled_features(tmp_path, layout):
    keras_notop = random_keras_xception(seed=2, include_top=False)
    save = save_official_layout if layout == "official" else save_keras3_h5
    path = save(keras_notop, tmp_path / "notop.h5")
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


def test_official_top_file_into_model_without_classifier_is_refused(weight_files):
    model = xception.create_model("xception", num_classes=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(xception.WeightFileError, match=r"'dense_2', 1000 classes.*num_classes=1000"):
        xception.load_weights(model, weight_files["official"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_official_layout_of_another_network_is_refused(weight_files, tmp_path):
    """One separable convolution too few (a Keras 1 file of another network): refused, the model untouched."""
    import h5py

    path = tmp_path / "other.h5"
    with h5py.File(weight_files["official"], "r") as src, h5py.File(path, "w") as dst:
        names = [text(n) for n in src.attrs["layer_names"] if text(n) != "separableconvolution2d_34"]
        dst.attrs["layer_names"] = [n.encode() for n in names]
        for name in names:
            src.copy(src[name], dst, name=name)
    model = xception.create_model("xception")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(xception.WeightFileError, match="33 separable convolution layers where the model has 34"):
        xception.load_weights(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_official_layout_with_a_wrong_shape_names_the_tensor(weight_files, tmp_path):
    import h5py

    path = tmp_path / "wrong.h5"
    with h5py.File(weight_files["official"], "r") as src, h5py.File(path, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for name in src:
            src.copy(src[name], dst, name=name)
        del dst["batchnormalization_3"]["batchnormalization_3_gamma:0"]
        dst["batchnormalization_3"].create_dataset("batchnormalization_3_gamma:0", data=np.ones(64, "float32"))
    with pytest.raises(xception.WeightFileError, match=r"blocks.block2.shortcut.bn.weight expected \(128,\), "
                                                       r"found \(64,\)"):
        xception.create_model("xception", weights=path)


@pytest.fixture(scope="module")
def keras3_finetuned(tmp_path_factory):
    """A Keras 3 user's fine-tuned Xception as Keras's transfer-learning guide builds it (the base without its top,
    pooled; dropout; a new Dense head), saved by Keras 3 itself in both of its own formats."""
    import keras

    base = random_keras_xception(seed=6, include_top=False)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Dropout(0.2)(base(inputs, training=False))
    outputs = keras.layers.Dense(5, bias_initializer=keras.initializers.RandomNormal(stddev=0.1, seed=1))(x)
    model = keras.Model(inputs, outputs)
    folder = tmp_path_factory.mktemp("keras3_native")
    model.save_weights(folder / "finetuned.weights.h5")
    model.save(folder / "finetuned.keras")
    return model, folder


@pytest.mark.parametrize("filename", ["finetuned.weights.h5", "finetuned.keras"])
def test_keras3_finetuned_model_matches_keras(keras3_finetuned, filename):
    keras_model, folder = keras3_finetuned
    model = xception.create_model("xception", num_classes=5, weights=folder / filename).eval()
    x = images((240, 320), seed=4)
    expected = np.asarray(keras_model(x, training=False).detach().cpu())
    assert relative_error(torch_logits(model, x), expected) <= TOLERANCE
    assert relative_error(expected[0], expected[1]) > 100 * TOLERANCE


def test_keras3_weights_of_another_network_are_refused(tmp_path):
    import keras

    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3)(inputs)))
    path = tmp_path / "small.weights.h5"
    keras.Model(inputs, outputs).save_weights(path)
    with pytest.raises(xception.WeightFileError, match="1 convolution layers where the model has 6"):
        xception.create_model("xception", num_classes=3, weights=path)


def test_other_keras_shaped_files_say_which_keras_formats_are_read(tmp_path):
    import h5py

    path = tmp_path / "model.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = "{}"  # a whole-model file without the weights group
    with pytest.raises(xception.WeightFileError, match=r"official Keras 1 files.*\.keras archives"):
        xception.create_model("xception", weights=path)
