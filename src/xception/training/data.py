"""The data of a training run: train and validation sets with their transforms, sharded samplers, loaders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ..data import (
    FASHION_MNIST_CLASSES,
    ImageDataset,
    ResumableSampler,
    collate_skipping,
    eval_transform,
    load_fashion_mnist,
    train_transform,
)
from ..errors import InvalidArgumentError
from ..weights.loading import registered_weights
from .recipes import Recipe

if TYPE_CHECKING:
    from .config import TrainConfig
    from .distributed import Distributed


def build_datasets(config: TrainConfig, recipe: Recipe) -> tuple[ImageDataset, ImageDataset]:
    """Train and validation sets; errors about the data come here, before any training."""
    train, val = load_split_datasets(config, recipe)
    if config.classes is not None or config.train_per_class is not None:
        train = train.subset(config.class_list(), config.train_per_class)
        val = val.subset(config.class_list())
    return train, val


def samplers(train_size: int, val_size: int, config: TrainConfig, recipe: Recipe,
             distributed: Distributed) -> tuple[ResumableSampler, ResumableSampler]:
    """The training sampler (shuffled, sharded in chunks of one batch, incomplete batches dropped: the ranks'
    batches of a step form the same global batch as one process would see) and the validation one (in order,
    sharded), of any task's datasets."""
    train_sampler = ResumableSampler(train_size, shuffle=True, seed=config.seed, rank=distributed.rank,
                                     world_size=distributed.world_size, drop_last=True, chunk=recipe.batch_size)
    val_sampler = ResumableSampler(val_size, shuffle=False, rank=distributed.rank, world_size=distributed.world_size)
    return train_sampler, val_sampler


def load_split_datasets(config: TrainConfig, recipe: Recipe) -> tuple[ImageDataset, ImageDataset]:
    if config.data == "fashion-mnist":
        images, labels = load_fashion_mnist("train")
        if config.train_subset:
            images, labels = images[: config.train_subset], labels[: config.train_subset]
        test_images, test_labels = load_fashion_mnist("test")
        if config.val_subset:
            test_images, test_labels = test_images[: config.val_subset], test_labels[: config.val_subset]
        classes = list(FASHION_MNIST_CLASSES)
        train = ImageDataset.in_memory(images, labels, train_transform(recipe.img_size, 1, recipe.augmentation,
                                                                       erasing=recipe.random_erasing),
                                       classes, seed=config.seed)
        val = ImageDataset.in_memory(test_images, test_labels, eval_transform(recipe.img_size, 1), classes)
        return train, val
    root = Path(config.data)
    # The folder's channel count is known once it is scanned, and the transforms depend on it.
    train = ImageDataset.from_folder(root, "train", None, seed=config.seed)
    val = ImageDataset.from_folder(root, "val", None, classes=train.classes)
    train.transform = train_transform(recipe.img_size, train.in_chans, recipe.augmentation,
                                      erasing=recipe.random_erasing)
    val.transform = eval_transform(recipe.img_size, train.in_chans, recipe.eval_resize_ratio)
    registered = registered_weights(recipe.model, config.weights) if config.weights else None
    if registered is not None and train.in_chans == 3:
        val.transform = registered.transforms()  # fine-tuning registered weights: evaluated as they were made
    val.in_chans = train.in_chans
    return train, val


def make_loader(dataset: Dataset, sampler: ResumableSampler, batch_size: int, workers: int,
                drop_last: bool = False, collate_fn: Callable = collate_skipping) -> DataLoader:
    """A loader of (inputs, labels, number of unreadable samples skipped) batches."""
    # A private generator: creating an iterator must not draw from the global RNG, or a resumed run (which
    # creates its iterator at another moment) would see different dropout masks.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      collate_fn=collate_fn, generator=torch.Generator().manual_seed(0))


def batch_mixer(recipe: Recipe, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], tuple] | None:
    """MixUp and/or CutMix on a batch (torchvision's transforms.v2, one of the two per batch when both are on):
    images and integer labels -> mixed images and soft targets. None when both are off. They draw from torch's
    global random state, which checkpoints carry, so a resumed run mixes as the uninterrupted one would."""
    mixers = [mix(alpha=alpha, num_classes=num_classes) for mix, alpha in ((v2.MixUp, recipe.mixup),
                                                                          (v2.CutMix, recipe.cutmix)) if alpha > 0]
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def class_weights(dataset: ImageDataset, recipe: Recipe) -> torch.Tensor | None:
    """Per-class loss weights: "balanced" gives each class N / (classes x its count), as scikit-learn's
    compute_class_weight does, so that rare classes count as much as common ones."""
    if recipe.class_weights is None:
        return None
    if recipe.class_weights != "balanced":
        raise InvalidArgumentError(f"class weights {recipe.class_weights!r} are for segmentation: classification "
                                   "takes --class-weights balanced")
    counts = torch.bincount(torch.tensor(dataset.source.label_list()), minlength=len(dataset.classes)).double()
    return (counts.sum() / (len(counts) * counts.clamp(min=1))).float()
