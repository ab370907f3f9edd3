"""Reference Xception models from keras.applications with random weights, and their legacy HDF5 files.

Random BatchNorm statistics that do not match the activations make a deep network's output almost
independent of its input, and a parity test on such a network proves little. So each BN layer is first
calibrated on real batch statistics (one training-mode pass with momentum 0) and then perturbed.
"""

from __future__ import annotations

import io
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
    model = xception_in_creation_order(weights=None, include_top=include_top, pooling=None if include_top else "avg",
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


# Keras 1's spelling of each weight, as the official files carry it (the moving variance was "running_std").
KERAS1_SUFFIX = {"kernel": "W", "bias": "b", "depthwise_kernel": "depthwise_kernel",
                 "pointwise_kernel": "pointwise_kernel", "gamma": "gamma", "beta": "beta",
                 "moving_mean": "running_mean", "moving_variance": "running_std"}
KERAS1_CLASS = {"Conv2D": "convolution2d", "SeparableConv2D": "separableconvolution2d",
                "BatchNormalization": "batchnormalization", "Dense": "dense"}


def xception_in_creation_order(**kwargs) -> keras.Model:
    """``keras.applications.Xception(**kwargs)``, remembering the order in which its code created each layer:
    the order that Keras 1 numbered the layers of the official files by. Recorded from Keras itself (every layer
    passes through ``Layer.__init__``), not assumed."""
    from keras.src.layers.layer import Layer

    created: list[Layer] = []
    original = Layer.__init__

    def recording_init(self, *args, **kw):
        created.append(self)
        original(self, *args, **kw)

    Layer.__init__ = recording_init
    try:
        model = keras.applications.Xception(**kwargs)
    finally:
        Layer.__init__ = original
    position = {id(layer): i for i, layer in enumerate(created)}
    order = tuple(layer.name for layer in sorted(model.layers, key=lambda layer: position[id(layer)]))
    object.__setattr__(model, "creation_order", order)  # past Keras's attribute tracking
    return model


def save_official_layout(model: keras.Model, path: Path, first_number: int = 1) -> Path:
    """The layout of the official 2016 files (xception-facts.md, "The official files"), written from Keras's own
    legacy writer and then rewritten the way Keras 1 named an unnamed model's layers:

    - every weighted layer renamed by its Keras 1 class and creation rank (``convolution2d_1..6``,
      ``separableconvolution2d_1..34``, ``batchnormalization_1..40``); the Dense is ``dense_2``, as in the real top
      file; ``first_number`` shifts every number, since nothing guarantees where Keras 1's counters stood;
    - the datasets flat in each group (``convolution2d_1_W:0``, ``batchnormalization_1_running_std:0``);
    - no ``keras_version`` or ``backend`` attribute;
    - ``layer_names`` in the Keras model's layer order (a block's shortcut after its separable convolutions),
      which is not the numbering order.

    Evidence for the layout: kazuto1011/pytorch-ported-models ``load_keras_xceptionv1`` reads the real file (same
    MD5) by exactly these names with a strict ``load_state_dict``; balancap/SSD-Tensorflow and keras-team/keras
    issues #9683 and #7006 agree."""
    counters: dict[str, int] = {}
    renamed: dict[str, str] = {}
    for name in model.creation_order:
        layer = model.get_layer(name)
        if not layer.weights:
            continue
        keras1 = KERAS1_CLASS[type(layer).__name__]
        counters[keras1] = counters.get(keras1, (2 if keras1 == "dense" else 1) + first_number - 1)
        renamed[name] = f"{keras1}_{counters[keras1]}"
        counters[keras1] += 1
    source = io.BytesIO()
    with h5py.File(source, "w") as written:
        save_weights_to_hdf5_group(written, model)
    with h5py.File(source, "r") as src, h5py.File(path, "w") as dst:
        names = [n.decode() if isinstance(n, bytes) else n for n in src.attrs["layer_names"]]
        dst.attrs["layer_names"] = [renamed.get(n, n).encode() for n in names]
        for name in names:
            new = renamed.get(name, name)
            group = dst.create_group(new)
            weight_names = []
            for weight in src[name].attrs["weight_names"]:
                weight = weight.decode() if isinstance(weight, bytes) else weight
                flat = f"{new}_{KERAS1_SUFFIX[weight.split('/')[-1].split(':')[0]]}:0"
                group.create_dataset(flat, data=src[name][weight][()])
                weight_names.append(flat.encode())
            group.attrs["weight_names"] = weight_names
    return path


def random_keras_h5(path: Path, include_top: bool, seed: int, layout: str = "official") -> Path:
    """A weight file with random weights and random (uncalibrated) BN statistics, in the official files' layout
    or as Keras 3's legacy writer leaves it: for tests that compare loads of the same file with each other, not
    with Keras's outputs (cheaper to make)."""
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    model = xception_in_creation_order(weights=None, include_top=include_top, pooling=None if include_top else "avg",
                                       input_shape=None if include_top else (None, None, 3))
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.get_weights()[0].shape
            layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.2, shape), rng.normal(0, 0.2, shape),
                               rng.uniform(0.5, 2.0, shape)])
    return save_official_layout(model, path) if layout == "official" else save_keras3_h5(model, path)
