"""Registered pretrained weights: one data table.

A :class:`Weights` object carries everything about one set of pretrained weights: the files (with and
without the classifier) with their URLs and checksums, the metadata (parameter count, categories,
reported accuracy, source, license) and the evaluation transforms. Loading them is :mod:`.loading`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError
from .download import HubFile, WeightFile

if TYPE_CHECKING:
    from ..data.transforms import ClassificationTransform


@cache
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet class names in the index order of the official weights."""
    text = resources.files("xception").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)


@dataclass(frozen=True)
class Weights:
    """One registered set of pretrained weights for one model."""

    model: str
    name: str
    file: WeightFile | HubFile  # with the classifier
    notop_file: WeightFile | HubFile | None  # the same weights without the classifier, where published
    num_classes: int
    meta: dict[str, Any] = field(default_factory=dict)
    transform_config: dict[str, Any] = field(default_factory=dict)

    def transforms(self) -> ClassificationTransform:
        """The preprocessing these weights expect, for evaluation: resize, centre crop, scale to [-1, 1]."""
        from ..data.transforms import ClassificationTransform

        return ClassificationTransform(**self.transform_config)

    @property
    def categories(self) -> tuple[str, ...]:
        return imagenet_categories() if self.meta.get("categories") == "imagenet" else ()

    def file_for(self, num_classes: int) -> WeightFile | HubFile:
        """The file to load into a model with ``num_classes`` outputs: the one without the classifier
        unless the model's classifier is the one the weights were trained with."""
        if num_classes == self.num_classes or self.notop_file is None:
            return self.file
        return self.notop_file


KERAS_RELEASES = "https://storage.googleapis.com/tensorflow/keras-applications/xception/"
GITHUB_RELEASES = "https://github.com/fchollet/deep-learning-models/releases/download/v0.4/"


def keras_file(filename: str, md5: str, sha256: str, num_bytes: int) -> WeightFile:
    """An official Keras file, pinned twice: by the MD5 Keras itself checks, and by the SHA-256 of public copies
    (their Git LFS ids), so that a collision in the weaker hash cannot pass."""
    return WeightFile(filename, (KERAS_RELEASES + filename, GITHUB_RELEASES + filename), md5, num_bytes,
                      sha256_prefix=sha256)


TIMM_RELEASES = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
TIMM_TPU_RELEASES = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-tpu-weights/"
TF_SOURCE = "DeepLab (tensorflow/models) ImageNet checkpoints, ported to PyTorch by timm"
RA3_SOURCE = "timm's ImageNet-1k training (RandAugment recipe 'ra3'), from the Hugging Face Hub"
# The evaluation transforms timm uses for each set: crop 299 after resizing the shorter side to 299 / crop_pct.
TF_TRANSFORM = {"resize_size": 331, "crop_size": 299, "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}
RA3_TRANSFORM = {**TF_TRANSFORM, "resize_size": 318}  # crop_pct 0.94


def release_file(base_url: str, filename: str, num_bytes: int | None) -> WeightFile:
    """A timm GitHub release file, pinned by the SHA-256 prefix in its name (torch hub's convention,
    ``name-<8 hex>.pth``) and by its size where timm's documentation publishes it."""
    digest = filename.rsplit("-", 1)[1].removesuffix(".pth")
    return WeightFile(filename, (base_url + filename,), md5=None, num_bytes=num_bytes, sha256_prefix=digest)


def deeplab_tf_weights(model: str, filename: str, num_bytes: int, num_params: int, top1: float,
                       top5: float) -> Weights:
    """DeepLab's TensorFlow ImageNet checkpoints of the aligned models as ported by timm. Only the SHA-256 prefix in
    each file name and the file sizes are published (timm's model documentation), so those pin the files."""
    return Weights(
        model=model, name="tf_in1k", num_classes=1000, notop_file=None,
        file=release_file(TIMM_RELEASES, filename, num_bytes),
        meta={"num_params": num_params, "categories": "imagenet", "source": TF_SOURCE, "license": "Apache-2.0",
              "metrics": {"ImageNet-1k": {"top1": top1, "top5": top5}}},
        transform_config=TF_TRANSFORM)


def timm_ra3_weights(model: str, num_params: int, top1: float, *, revision: str, sha256: str | None,
                     mirror: str) -> Weights:
    """timm's own training of the aligned models: ``model.safetensors`` of the Hub repository
    ``timm/<model>.ra3_in1k`` at ``revision`` (and ``sha256`` where it is published), with timm's GitHub release of
    the same weights (a .pth, pinned by the SHA-256 prefix in its name; no size is published) as the mirror. Top-1
    as timm reports it; no top-5 is published."""
    file = HubFile(f"timm/{model}.ra3_in1k", revision=revision, sha256=sha256,
                   mirrors=(release_file(TIMM_TPU_RELEASES, mirror, None),))
    return Weights(
        model=model, name="ra3_in1k", num_classes=1000, notop_file=None, file=file,
        meta={"num_params": num_params, "categories": "imagenet", "source": RA3_SOURCE, "license": "Apache-2.0",
              "metrics": {"ImageNet-1k": {"top1": top1}}},
        transform_config=RA3_TRANSFORM)


# Every registered set of weights, one row each. Parameter counts are those of the 1000-class model (tested).
WEIGHTS: tuple[Weights, ...] = (
    Weights(
        model="xception",
        name="imagenet",
        file=keras_file("xception_weights_tf_dim_ordering_tf_kernels.h5", "0a58e3b7378bc2990ea3b43d5981f1f6",
                        "c5bf1c05b020c4177164039b854c3ef92b16b73384734647c1f0ad5cf79f6975", 91_884_032),
        notop_file=keras_file("xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                              "b0042744bf5b25fce3cb969f33bebb97",
                              "e3fa32521ed48ced4af05adc950ab24963c4a00bd42e6825f8b180c65853163c", 83_683_744),
        num_classes=1000,
        meta={
            "num_params": 22_855_952,
            "categories": "imagenet",
            "metrics": {"ImageNet-1k": {"top1": 79.0, "top5": 94.5}},
            "source": "Official Keras Applications weights by F. Chollet (keras.applications.Xception)",
            "paper": "Chollet, Xception: Deep Learning with Depthwise Separable Convolutions, CVPR 2017",
            "license": "MIT",
            "numerics": "keras",
        },
        # The Keras example resizes the whole image to 299x299; timm's evaluation of the same weights resizes
        # to 333 and crops 299 (bicubic), which measured 79.06 top-1. We follow the latter for evaluation.
        transform_config={"resize_size": 333, "crop_size": 299, "interpolation": "bicubic", "mean": (0.5,) * 3,
                          "std": (0.5,) * 3},
    ),
    deeplab_tf_weights("xception41", "tf_xception_41-e6439c97.pth", 108_422_028, 26_969_560, 78.54, 94.28),
    deeplab_tf_weights("xception65", "tf_xception_65-c9ae96e8.pth", 160_536_780, 39_916_312, 79.55, 94.66),
    deeplab_tf_weights("xception71", "tf_xception_71-8eec7df1.pth", 170_295_556, 42_338_736, 79.88, 94.93),
    # The ra3_in1k pins, and where each comes from (no value below was guessed; what could not be found is None):
    # - revisions: the Hub's "Add model" commit of each repository (Apr 21 2023), the last to touch
    #   model.safetensors, read from the Hub's commit pages huggingface.co/timm/<repo>/commit/<sha> (xception65) and
    #   tree/<sha> (xception41p). No commit of timm/xception65p.ra3_in1k could be found: it follows the branch "main".
    # - sha256: the Git LFS SHA-256 the Hub's page of timm/xception41p.ra3_in1k/blob/main/model.safetensors shows
    #   (commit 327b9de). None was found for the other two: their downloads are checked against the SHA-256 the Hub
    #   gives for the file at the pinned revision (its LFS id), not against a value fixed here.
    # - mirrors: the same weights as timm's GitHub release files in v0.1-tpu-weights, pinned by the SHA-256 prefix
    #   in their names (listed in timm commit 94bcdebd, as issue #15 cites them; not checked against another
    #   source here). No size is published for them.
    timm_ra3_weights("xception65", 39_916_312, 83.19, revision="ae9e1377bca4c1d5ce324a5e010f7bc72bc322a4",
                     sha256=None, mirror="xception65_ra3-1447db8d.pth"),
    timm_ra3_weights("xception41p", 26_907_752, 81.98, revision="327b9de3a26a7077952e38fe40e9c811b1bba6d1",
                     sha256="84cc7268d4d0973769ac78db2c1d07e5bbfbcab2447d6f1df3f7b755ba7b2dea",
                     mirror="xception41p_ra3-33195bc8.pth"),
    timm_ra3_weights("xception65p", 39_819_560, 83.16, revision="main", sha256=None,
                     mirror="xception65p_ra3-3c6114e4.pth"),
)

# What ``weights="default"`` loads for each model: the most accurate registered set.
DEFAULT_WEIGHTS = {"xception": "imagenet", "xception41": "tf_in1k", "xception65": "ra3_in1k",
                   "xception71": "tf_in1k", "xception41p": "ra3_in1k", "xception65p": "ra3_in1k"}

_REGISTRY: dict[tuple[str, str], Weights] = {(weights.model, weights.name): weights for weights in WEIGHTS}


def list_weights(model: str | None = None) -> list[str]:
    """Registered weights as ``"model.name"`` (or just names, for one model)."""
    if model is not None:
        return sorted(name for m, name in _REGISTRY if m == model)
    return sorted(f"{m}.{name}" for m, name in _REGISTRY)


def get_weights(model: str, name: str = "default") -> Weights:
    """The registered weights ``name`` of ``model``; ``"default"`` is the model's best (:data:`DEFAULT_WEIGHTS`)."""
    if name == "default" and model in DEFAULT_WEIGHTS:
        name = DEFAULT_WEIGHTS[model]
    try:
        return _REGISTRY[(model, name)]
    except KeyError:
        available = ", ".join(list_weights(model)) or "none"
        raise InvalidArgumentError(f"no weights named {name!r} for model {model!r}; registered: {available}; "
                                   "or pass the path of a weight file") from None
