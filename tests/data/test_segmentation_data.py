"""The segmentation data: the folder layout and its up-front checks, joint augmentation that never blends
labels, padded batches, median-frequency weights, and the real CamVid folder when it is there."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segmentation_samples import CLASSES, REAL_CAMVID, write_segmentation_folder
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from xception.data import (
    ResumableSampler,
    SampleKey,
    SegmentationCollate,
    SegmentationDataset,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    median_frequency_weights,
    sample_labels,
)
from xception.data.segmentation import RandomScale
from xception.errors import InvalidArgumentError


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_segmentation_folder(tmp_path / "data", train=6, val=3)


def label_of(root: Path, split: str, stem: str) -> np.ndarray:
    return np.array(Image.open(root / split / "labels" / f"{stem}.png"))


def test_the_layout_reads_pairs_classes_and_pixel_counts(folder: Path) -> None:
    dataset = SegmentationDataset.from_folder(folder, "train", SegmentationEvalTransform())
    assert dataset.classes == list(CLASSES) and len(dataset) == 6 and dataset.in_chans == 3
    assert [image.stem for image, _ in dataset.pairs] == [label.stem for _, label in dataset.pairs]
    labels = [label_of(folder, "train", f"train{i:03d}") for i in range(6)]
    expected = [sum(int((label == c).sum()) for label in labels) for c in range(3)]
    assert dataset.class_pixels().tolist() == expected
    image, mask = dataset[SampleKey(0, 0)]
    # Evaluation is at full resolution: nothing resized or cropped.
    assert image.shape == (3, 32, 40) and image.dtype == torch.float32 and -1 <= image.min() <= image.max() <= 1
    assert mask.dtype == torch.int64 and torch.equal(mask, torch.from_numpy(labels[0]).long())


def test_masks_are_never_interpolated_bilinearly() -> None:
    """Labels 0 and 10 in a checkerboard: any blending would create values in between (5, 3, ...)."""
    mask = torch.zeros(1, 24, 30, dtype=torch.uint8)
    mask[:, ::2, ::2] = mask[:, 1::2, 1::2] = 10
    mask[:, :3] = 255
    image = torch.randint(0, 256, (3, 24, 30), dtype=torch.uint8)
    transform = SegmentationTrainTransform(crop_size=40, ignore_index=255, style="deeplab")
    for seed in range(30):
        torch.manual_seed(seed)
        _, out = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert set(out.unique().tolist()) <= {0, 10, 255}
    for factor in ((0.5, 0.5), (1.37, 1.37), (2.0, 2.0)):
        scaled = RandomScale(factor)(tv_tensors.Mask(mask))
        assert set(scaled.unique().tolist()) <= {0, 10, 255} and scaled.shape[-1] == round(30 * factor[0])


def test_the_deeplab_scale_range_is_the_one_given() -> None:
    """A 20x30 image of one label, crops large enough to hold it whole at any scale drawn: the labelled pixels
    count the scale. DeepLab's 0.5-2.0 by default; a fixed scale, and a narrower range, as given."""
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    mask = torch.ones(1, 20, 30, dtype=torch.uint8)

    def scaled_sides(scale_range: tuple[float, float] | None, seeds: int = 40) -> list[float]:
        options = {} if scale_range is None else {"scale_range": scale_range}
        transform = SegmentationTrainTransform(crop_size=64, style="deeplab", **options)
        sides = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            _, out = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
            labelled = out == 1
            sides.append(labelled.any(0).sum().item() / 30)  # the labelled width over the original width
        return sides

    default = scaled_sides(None)
    assert 0.5 <= min(default) < 0.8 and 1.7 < max(default) <= 2.0
    assert scaled_sides((1.5, 1.5), seeds=3) == [1.5] * 3
    narrow = scaled_sides([0.75, 1.25])  # a list, as JSON gives it, works too
    assert 0.74 <= min(narrow) < 0.9 and 1.1 < max(narrow) <= 1.26


@pytest.mark.parametrize("scale_range", [(2.0, 1.0), (0.0, 1.0), (-1.0, 2.0), (1.0,), ("a", 1.0),
                                         (1.0, float("inf"))])
def test_a_bad_scale_range_is_refused_with_the_flag_named(scale_range) -> None:
    with pytest.raises(InvalidArgumentError, match=r"--scale-range LOW HIGH"):
        SegmentationTrainTransform(crop_size=64, style="deeplab", scale_range=scale_range)


def test_image_and_mask_move_together() -> None:
    """The image carries its label in its pixel values; after scaling, cropping and flipping they still agree
    away from the boundaries, where the image (and only the image) is blended: pixels whose 5x5 neighbourhood
    in the mask holds one label."""
    mask = torch.zeros(1, 60, 80, dtype=torch.uint8)
    mask[:, 10:40, 16:60] = 1
    mask[:, 44:56, 4:24] = 2
    image = (mask * 100).expand(3, -1, -1).clone()
    steps = SegmentationTrainTransform(crop_size=48, style="basic")._steps
    for seed in range(10):
        torch.manual_seed(seed)
        out_image, out_mask = RandomScale()(tv_tensors.Image(image), tv_tensors.Mask(mask))
        out_image, out_mask = steps(out_image, out_mask)
        labels = out_mask[0].float()
        uniform = (torch.nn.functional.max_pool2d(labels[None], 5, 1, 2) ==
                   -torch.nn.functional.max_pool2d(-labels[None], 5, 1, 2))[0]
        interior = uniform & (out_mask[0] != 255)
        assert interior.sum() > 50
        assert torch.equal((out_image[0][interior].float() / 100).round(), labels[interior])


def test_the_crop_pads_masks_with_the_ignore_index_and_images_with_grey() -> None:
    image = torch.full((3, 8, 10), 7, dtype=torch.uint8)
    mask = torch.ones(1, 8, 10, dtype=torch.uint8)
    out_image, out_mask = SegmentationTrainTransform(crop_size=16, ignore_index=200, style="none")(
        tv_tensors.Image(image), tv_tensors.Mask(mask))
    assert out_image.shape == (3, 16, 16) and out_mask.shape == (16, 16)
    assert int((out_mask == 1).sum()) == 80 and int((out_mask == 200).sum()) == 256 - 80
    padded = out_image[:, out_mask == 200]
    assert torch.allclose(padded, torch.full_like(padded, 128 / 127.5 - 1), atol=1e-6)


def test_augmentation_is_seeded_per_sample(folder: Path) -> None:
    dataset = SegmentationDataset.from_folder(folder, "train", SegmentationTrainTransform(24), seed=3)
    first, again, other = dataset[SampleKey(1, 2)], dataset[SampleKey(1, 2)], dataset[SampleKey(2, 2)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_collate_pads_to_the_largest_and_skips_unreadable() -> None:
    small = (torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.int64))
    large = (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.int64))
    images, masks, skipped = SegmentationCollate(ignore_index=255)([small, None, large])
    assert images.shape == (2, 3, 6, 5) and masks.shape == (2, 6, 5) and skipped == 1
    assert (masks[0, 4:] == 255).all() and (masks[0, :, :5][:4] == 0).all() and (images[0, :, 4:] == 0).all()
    assert (masks[1, :, 3:] == 255).all()
    images, masks, skipped = SegmentationCollate()([None])
    assert skipped == 1 and len(images) == 0 and len(masks) == 0


def test_sampled_labels_are_the_centre_of_each_cell_and_never_blended() -> None:
    """A label map whose value is its pixel's row x 100 + column: the stride-s grid keeps rows and columns
    s // 2, s // 2 + s, ... (the pixel at or just past each s x s cell's centre), values untouched."""
    rows, cols = torch.meshgrid(torch.arange(9), torch.arange(12), indexing="ij")
    masks = (rows * 100 + cols).expand(2, 9, 12)
    assert torch.equal(sample_labels(masks, 1), masks)
    two = sample_labels(masks, 2)
    assert two.shape == (2, 4, 6) and two[0, :, 0].tolist() == [101, 301, 501, 701] and two[0, 0].tolist() == [
        101, 103, 105, 107, 109, 111]
    three = sample_labels(masks, 3)
    assert three.shape == (2, 3, 4) and three[1, 2].tolist() == [701, 704, 707, 710]
    assert set(sample_labels(masks, 4).unique().tolist()) <= set(masks.unique().tolist())
    with pytest.raises(InvalidArgumentError, match="label stride must be a positive integer, got 0"):
        sample_labels(masks, 0)


def test_an_unreadable_image_is_skipped_and_counted(folder: Path, caplog) -> None:
    (folder / "train" / "images" / "train002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    dataset = SegmentationDataset.from_folder(folder, "train", SegmentationTrainTransform(16))
    loader = DataLoader(dataset, batch_size=3, sampler=ResumableSampler(len(dataset), shuffle=False),
                        collate_fn=SegmentationCollate())
    with caplog.at_level(logging.WARNING, logger="xception.data"):
        batches = list(loader)
    assert sum(skipped for _, _, skipped in batches) == 1 and sum(len(m) for _, m, _ in batches) == 5
    assert "train002.png" in caplog.text


def test_median_frequency_weights_by_hand(tmp_path: Path) -> None:
    """Two 2x2 label maps: [[0, 0], [0, 1]] and [[0, 255], [2, 2]].
    freq_0 = 4 / 8 (present in both, 8 pixels); freq_1 = 1 / 4; freq_2 = 2 / 4. Median 0.5: weights 1, 2, 1."""
    root = tmp_path / "tiny"
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\nc\nunused\n")
    for name, label in (("x", [[0, 0], [0, 1]]), ("y", [[0, 255], [2, 2]])):
        Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(root / "train" / "images" / f"{name}.png")
        Image.fromarray(np.array(label, np.uint8)).save(root / "train" / "labels" / f"{name}.png")
    weights = median_frequency_weights(SegmentationDataset.from_folder(root, "train"))
    assert weights.tolist() == pytest.approx([1.0, 2.0, 1.0, 0.0])  # "unused" has no pixels: weight 0


def save_label(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


@pytest.mark.parametrize(("breakage", "message"), [
    (lambda r: (r / "classes.txt").unlink(), r"classes\.txt is missing"),
    (lambda r: (r / "classes.txt").write_text("\n\n"), "names no classes"),
    (lambda r: (r / "train" / "labels" / "train001.png").unlink(), r"have no label file: train001\.png"),
    (lambda r: save_label(r / "train" / "labels" / "extra.png", np.zeros((32, 40), np.uint8)),
     r"have no image: extra\.png"),
    (lambda r: save_label(r / "train" / "labels" / "train004.png", np.zeros((30, 40), np.uint8)),
     r"train004\.png is 40x30 but its image is 40x32"),
    (lambda r: save_label(r / "train" / "labels" / "train003.png", np.full((32, 40), 7, np.uint8)),
     r"train003\.png holds the values \[7\], which are neither a class \(0\.\.2"),
    (lambda r: save_label(r / "train" / "labels" / "train000.png", np.zeros((32, 40, 3), np.uint8)),
     "is a RGB image; labels must be 8-bit single-channel.*colour-coded"),
    (lambda r: (r / "train" / "labels" / "train005.png").write_bytes(b"garbage"), r"train005\.png cannot be read"),
    (lambda r: [p.unlink() for p in (r / "train" / "images").iterdir()], "holds no images.*the split is empty"),
    (lambda r: (r / "train" / "labels").rename(r / "train" / "masks"), "has no labels/ folder"),
])
def test_bad_layouts_are_clear_errors_before_training(folder: Path, breakage, message: str) -> None:
    breakage(folder)
    with pytest.raises((InvalidArgumentError, FileNotFoundError), match=message):
        SegmentationDataset.from_folder(folder, "train")


def test_a_missing_split_and_an_ignore_index_that_is_a_class(folder: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no split folder 'test'.*train, val"):
        SegmentationDataset.from_folder(folder, "test")
    with pytest.raises(InvalidArgumentError, match="ignore index 2 is also class 'square'"):
        SegmentationDataset.from_folder(folder, "train", ignore_index=2)
    # Another ignore index makes 255 an out-of-range label: the frame of the synthetic scenes.
    with pytest.raises(InvalidArgumentError, match=r"holds the values \[255\].*ignore index 254"):
        SegmentationDataset.from_folder(folder, "train", ignore_index=254)


@pytest.mark.skipif(not (REAL_CAMVID / "classes.txt").is_file(),
                    reason=f"the real CamVid folder is not at {REAL_CAMVID} (see shared/datasets/camvid/README.md)")
def test_the_real_camvid_folder() -> None:
    """CamVid as shipped in shared/datasets: 367 train and 101 val pairs at 480x360, 11 classes, void = 255."""
    train = SegmentationDataset.from_folder(REAL_CAMVID, "train", SegmentationTrainTransform(256))
    val = SegmentationDataset.from_folder(REAL_CAMVID, "val", SegmentationEvalTransform())
    assert (len(train), len(val)) == (367, 101)
    assert train.classes[:4] == ["sky", "building", "pole", "road"] and len(train.classes) == 11
    # The README's pixel counts per class in train (in millions, rounded there to two digits).
    assert train.class_pixels()[3] / 1e6 == pytest.approx(20.1, abs=0.05)
    for index in range(3):
        image, mask = val[SampleKey(0, index)]
        assert image.shape == (3, 360, 480) and mask.shape == (360, 480)
        assert set(mask.unique().tolist()) <= {*range(11), 255}
        image, mask = train[SampleKey(0, index)]
        assert image.shape == (3, 256, 256) and set(mask.unique().tolist()) <= {*range(11), 255}
