"""Reference Xception models from keras.applications with random weights, and their legacy HDF5 files.

Random BatchNorm statistics that do not match the activations make a deep network's output almost
independent of its input, and a parity test on such a network proves little. So each BN layer is first
calibrated on real batch statistics (one training-mode pass with momentum 0) and then perturbed.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import h5py
import keras
import numpy as np
from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group


def random_keras_xception(seed: int = 0, include_top: bool = True) -> keras.Model:
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    model = keras.applications.Xception(weights=None, include_top=include_top, pooling=None if include_top else "avg",
                                        input_shape=None if include_top else (None, None, 3))
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        gamma, beta, mean, var = layer.get_weights()
        layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape), mean, var])
        layer.momentum = 0.0
    model(rng.uniform(-1, 1, (8, 299, 299, 3)).astype("float32"), training=True)
    for layer in norms:
        layer.momentum = 0.99
        gamma, beta, mean, var = layer.get_weights()
        layer.set_weights([gamma, beta, mean + rng.normal(0, 0.1, mean.shape) * np.sqrt(var),
                           var * rng.uniform(0.7, 1.4, var.shape)])
    if include_top:
        kernel, bias = model.get_layer("predictions").get_weights()
        model.get_layer("predictions").set_weights([kernel, rng.normal(0, 0.1, bias.shape)])
    return model


def keras_features_model(model: keras.Model) -> keras.Model:
    """The same weights without the classifier, pooled, for any input size (include_top fixes 299x299)."""
    features = keras.applications.Xception(weights=None, include_top=False, pooling="avg", input_shape=(None, None, 3))
    features.set_weights(model.get_weights()[: len(features.get_weights())])
    return features


def keras_logits(model: keras.Model, images_nhwc: np.ndarray) -> np.ndarray:
    """Logits before Keras's softmax, at any input size."""
    pooled = np.asarray(keras_features_model(model)(images_nhwc, training=False).detach().cpu())
    kernel, bias = model.get_layer("predictions").get_weights()
    return pooled @ kernel + bias


def save_keras3_h5(model: keras.Model, path: Path) -> Path:
    """Written by Keras's own legacy writer: names like 'block1_conv1/kernel', shortcuts 'conv2d_1'."""
    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, model)
    return path


KERAS1_SUFFIX = {"kernel": "W", "bias": "b", "depthwise_kernel": "depthwise_kernel",
                 "pointwise_kernel": "pointwise_kernel", "gamma": "gamma", "beta": "beta",
                 "moving_mean": "running_mean", "moving_variance": "running_std"}


def rewrite_as_keras1(source: Path, path: Path) -> Path:
    """The layout of the official Keras-1-era files: 'block1_conv1_W:0', '..._bn_running_std:0' (holding the
    variance), shortcut layers named convolution2d_N / batchnormalization_N and stored after their block's
    separable convolutions."""
    with h5py.File(source, "r") as src:
        names = [n.decode() if isinstance(n, bytes) else n for n in src.attrs["layer_names"]]
        layers = {name: [(w.decode() if isinstance(w, bytes) else w) for w in src[name].attrs["weight_names"]]
                  for name in names}
        renamed: dict[str, str] = {}
        convs = norms = 0
        for name in names:
            if name.startswith("conv2d"):
                convs += 1
                renamed[name] = f"convolution2d_{convs}"
            elif name.startswith("batch_normalization"):
                norms += 1
                renamed[name] = f"batchnormalization_{norms}"
            else:
                renamed[name] = name
        # Move each shortcut pair after the last layer of its block (just before the next block starts).
        order: list[str] = []
        pending: list[str] = []
        current_block = None
        for name in names:
            block = name.split("_")[0] if name.startswith("block") else None
            if name in renamed and renamed[name] != name:
                pending.append(name)
                continue
            if block is not None and block != current_block:
                if current_block is not None and current_block != "block1":
                    order.extend(pending)
                    pending = []
                current_block = block
            order.append(name)
        order.extend(pending)
        with h5py.File(path, "w") as dst:
            dst.attrs["layer_names"] = [renamed[n].encode() for n in order]
            dst.attrs["keras_version"] = b"1.2.2"
            dst.attrs["backend"] = b"tensorflow"
            for name in order:
                new = renamed[name]
                group = dst.create_group(new)
                weight_names = []
                for weight in layers[name]:
                    leaf = weight.split("/")[-1].split(":")[0]
                    new_weight = f"{new}_{KERAS1_SUFFIX[leaf]}:0"
                    group.create_dataset(new_weight, data=src[name][weight][()])
                    weight_names.append(new_weight.encode())
                group.attrs["weight_names"] = weight_names
    return path


def random_keras_h5(path: Path, include_top: bool, seed: int) -> Path:
    """A file written by Keras's own HDF5 writer, with random weights and random (uncalibrated) BN statistics: for
    tests that compare loads of the same file with each other, not with Keras's outputs (cheaper to make)."""
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    model = keras.applications.Xception(weights=None, include_top=include_top, pooling=None if include_top else "avg",
                                        input_shape=None if include_top else (None, None, 3))
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.get_weights()[0].shape
            layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.2, shape), rng.normal(0, 0.2, shape),
                               rng.uniform(0.5, 2.0, shape)])
    return save_keras3_h5(model, path)
