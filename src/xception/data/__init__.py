"""Data: Fashion-MNIST and image folders, a resumable sampler, the one image decoder, and the transforms.

- :mod:`.fashion_mnist`: the IDX files (Debian's package, or torchvision's downloader).
- :mod:`.datasets`: :class:`ImageDataset` (in memory or a folder), :class:`ResumableSampler`, skipping collation.
- :mod:`.segmentation`: the segmentation folder layout (:class:`SegmentationDataset`, checked up front), joint
  image-and-mask augmentation, padded batches, median-frequency class weights.
- :mod:`.transforms`: :func:`decode_image`, the evaluation preprocessing of registered weights
  (:class:`ClassificationTransform`), and the training and evaluation transforms of training runs.
"""

from .datasets import (
    IMAGE_EXTENSIONS,
    ImageDataset,
    ResumableSampler,
    SampleKey,
    collate_skipping,
    readable_samples,
    resolve_class,
)
from .fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist
from .segmentation import (
    IGNORE_INDEX,
    SegmentationCollate,
    SegmentationDataset,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    median_frequency_weights,
    read_classes,
    sample_labels,
)
from .transforms import (
    ClassificationTransform,
    ImageError,
    Transform,
    decode_image,
    eval_transform,
    open_image,
    train_transform,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "ClassificationTransform",
    "ImageDataset",
    "ImageError",
    "ResumableSampler",
    "SampleKey",
    "SegmentationCollate",
    "SegmentationDataset",
    "SegmentationEvalTransform",
    "SegmentationTrainTransform",
    "Transform",
    "collate_skipping",
    "decode_image",
    "eval_transform",
    "load_fashion_mnist",
    "median_frequency_weights",
    "open_image",
    "read_classes",
    "readable_samples",
    "resolve_class",
    "sample_labels",
    "train_transform",
]
