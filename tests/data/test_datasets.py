"""The data layer: IDX and Fashion-MNIST, the resumable sampler, seeded augmentation, folders and robust decoding."""

from __future__ import annotations

import gzip
import logging
import random
import struct
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader

import xception
import xception.data.fashion_mnist as fashion_mnist
from xception.data import (
    FASHION_MNIST_CLASSES,
    ImageDataset,
    ImageError,
    ResumableSampler,
    SampleKey,
    collate_skipping,
    eval_transform,
    load_fashion_mnist,
    open_image,
    train_transform,
)
from xception.data.fashion_mnist import read_idx


def idx_bytes(array: torch.Tensor) -> bytes:
    """An uint8 tensor in IDX format, written independently of the reader."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.numpy().tobytes()


def write_fashion_mnist(directory: Path, split: str, count: int, compress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8)
    labels = torch.arange(count, dtype=torch.uint8) % 10
    directory.mkdir(parents=True, exist_ok=True)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        payload = idx_bytes(array)
        name = f"{prefix}-{kind}-ubyte"
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (directory / name).write_bytes(payload)
    return images, labels


# --------------------------------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trips_labels_and_images(tmp_path: Path, compress: bool) -> None:
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    images = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    for name, array in (("labels", labels), ("images", images)):
        payload = idx_bytes(array)
        path = tmp_path / name
        path.write_bytes(gzip.compress(payload) if compress else payload)
        loaded = read_idx(path)
        assert loaded.dtype == torch.uint8
        assert torch.equal(loaded, array)


@pytest.mark.parametrize(("header", "message"), [
    (b"\x12\x34\x08\x01", "not an IDX file"),
    (b"\x00\x00\x0b\x01", "data type 0x0b"),
    (b"", "not an IDX file"),
])
def test_read_idx_rejects_bad_magic(tmp_path: Path, header: bytes, message: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(header + struct.pack(">I", 2) + b"\x01\x02" if header else b"")
    with pytest.raises(ValueError, match=message):
        read_idx(path)


def test_read_idx_rejects_truncated_and_oversized_files(tmp_path: Path) -> None:
    payload = idx_bytes(torch.zeros(10, 28, 28, dtype=torch.uint8))
    cases = {
        "short.idx": (payload[:-1], "truncated"),
        "header.idx": (payload[:9], "truncated IDX header"),
        "long.idx": (payload + b"\x00", "trailing bytes"),
        "short.gz": (gzip.compress(payload)[:-20], "truncated gzip"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            read_idx(tmp_path / name)


# --------------------------------------------------------------------------------------------------- Fashion-MNIST

@pytest.fixture(scope="module")
def fashion_mnist_train() -> tuple[torch.Tensor, torch.Tensor]:
    if fashion_mnist._fashion_mnist_files(fashion_mnist.FASHION_MNIST_DIR, "train") is None:
        pytest.skip(f"Fashion-MNIST is not installed in {fashion_mnist.FASHION_MNIST_DIR} "
                    f"(apt-get install dataset-fashion-mnist)")
    return load_fashion_mnist("train")


@pytest.mark.parametrize(("split", "count"), [("train", 60000), ("test", 10000)])
def test_real_fashion_mnist_has_the_published_shape_and_balance(
        fashion_mnist_train: tuple[torch.Tensor, torch.Tensor], split: str, count: int) -> None:
    images, labels = fashion_mnist_train if split == "train" else load_fashion_mnist("test")
    assert images.shape == (count, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (count,) and labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert torch.bincount(labels).tolist() == [count // 10] * 10
    assert int(images.max()) == 255 and int(images.min()) == 0
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_load_fashion_mnist_reads_root_first(tmp_path: Path) -> None:
    images, labels = write_fashion_mnist(tmp_path, "test", 7, compress=False)
    loaded_images, loaded_labels = load_fashion_mnist("test", root=tmp_path)
    assert torch.equal(loaded_images, images)
    assert torch.equal(loaded_labels, labels.long())


@pytest.fixture
def no_local_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Neither the Debian directory nor torch's cache has the files; returns the cache's raw directory."""
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_DIR", tmp_path / "debian")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "datasets" / "FashionMNIST" / "raw"


def test_load_fashion_mnist_downloads_into_the_torch_cache(no_local_fashion_mnist: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(root: str, train: bool, download: bool) -> None:
        calls.append((root, download))
        write_fashion_mnist(Path(root) / "FashionMNIST" / "raw", "train", 5, compress=True)
        write_fashion_mnist(Path(root) / "FashionMNIST" / "raw", "test", 3, compress=True)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_download)
    images, labels = load_fashion_mnist("test")
    assert images.shape == (3, 28, 28) and labels.tolist() == [0, 1, 2]
    assert calls == [(str(no_local_fashion_mnist.parent.parent), True)]
    load_fashion_mnist("train")  # now found in the cache
    assert len(calls) == 1


def test_load_fashion_mnist_explains_how_to_install_when_download_fails(no_local_fashion_mnist: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(root: str, train: bool, download: bool) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist("train")
    assert "Error downloading" in str(info.value) and str(no_local_fashion_mnist) in str(info.value)


def test_load_fashion_mnist_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


# --------------------------------------------------------------------------------------------------- sampler

def indices(sampler: ResumableSampler) -> list[int]:
    keys = list(sampler)
    assert all(key.epoch == sampler.epoch for key in keys)
    return [key.index for key in keys]


def test_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    first, second = ResumableSampler(100, shuffle=True, seed=3), ResumableSampler(100, shuffle=True, seed=3)
    first.set_epoch(2)
    second.set_epoch(2)
    order = indices(first)
    assert order == indices(second) and sorted(order) == list(range(100))
    first.set_epoch(3)
    assert indices(first) != order
    other_seed = ResumableSampler(100, shuffle=True, seed=4)
    other_seed.set_epoch(2)
    assert indices(other_seed) != order
    assert indices(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("num_samples", [10, 11])
def test_sampler_shards_are_disjoint_and_cover_everything(num_samples: int) -> None:
    shards = [ResumableSampler(num_samples, shuffle=True, seed=1, rank=rank, world_size=2) for rank in (0, 1)]
    for shard in shards:
        shard.set_epoch(5)
    orders = [indices(shard) for shard in shards]
    assert len(orders[0]) == len(orders[1]) == len(shards[0]) == 6 - (num_samples == 10)
    assert set(orders[0]) | set(orders[1]) == set(range(num_samples))
    padding = 2 * len(orders[0]) - num_samples
    assert len(orders[0]) + len(orders[1]) - len(set(orders[0]) | set(orders[1])) == padding
    if padding == 0:
        assert not set(orders[0]) & set(orders[1])
    dropped = [ResumableSampler(num_samples, shuffle=True, rank=rank, world_size=2, drop_last=True) for rank in (0, 1)]
    dropped_orders = [indices(shard) for shard in dropped]
    assert len(dropped_orders[0]) == len(dropped_orders[1]) == num_samples // 2
    assert not set(dropped_orders[0]) & set(dropped_orders[1])


def test_sampler_start_yields_the_tail_of_the_epoch() -> None:
    sampler = ResumableSampler(50, shuffle=True, seed=7, rank=1, world_size=3)
    sampler.set_epoch(4)
    full = list(sampler)
    assert len(sampler) == len(full) == 17
    sampler.set_start(12)
    assert list(sampler) == full[12:] and len(sampler) == 5
    sampler.set_start(17)
    assert list(sampler) == [] and len(sampler) == 0
    sampler.set_epoch(5)
    assert len(sampler) == 17
    with pytest.raises(ValueError, match="start position"):
        sampler.set_start(18)


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, shuffle=False, rank=2, world_size=2)
    with pytest.raises(ValueError, match="positive"):
        ResumableSampler(0, shuffle=False)


# --------------------------------------------------------------------------------------------------- in-memory dataset

@pytest.fixture
def tiny_dataset() -> ImageDataset:
    images = torch.randint(0, 256, (12, 28, 28), dtype=torch.uint8)
    images[1] = images[0]  # same pixels: only the key can make their augmentations differ
    return ImageDataset.in_memory(images, torch.arange(12) % 10, train_transform(28, 1, "inception"),
                                  FASHION_MNIST_CLASSES, seed=11)


def test_in_memory_augmentation_is_seeded_by_key(tiny_dataset: ImageDataset) -> None:
    assert len(tiny_dataset) == 12 and tiny_dataset.in_chans == 1 and tiny_dataset.classes[0] == "T-shirt/top"
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    image, label = tiny_dataset[SampleKey(0, 3)]
    assert image.shape == (1, 28, 28) and label == 3
    assert torch.equal(tiny_dataset[SampleKey(0, 3)][0], image)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert not torch.equal(tiny_dataset[SampleKey(1, 3)][0], image)
    assert not torch.equal(tiny_dataset[SampleKey(0, 0)][0], tiny_dataset[SampleKey(0, 1)][0])


def load_all(dataset: ImageDataset, sampler: ResumableSampler, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=num_workers, collate_fn=collate_skipping)
    batches = list(loader)
    assert all(skipped == 0 for _, _, skipped in batches)
    return torch.cat([images for images, _, _ in batches]), torch.cat([labels for _, labels, _ in batches])


def test_in_memory_samples_do_not_depend_on_workers_or_resuming(tiny_dataset: ImageDataset) -> None:
    sampler = ResumableSampler(len(tiny_dataset), shuffle=True, seed=2)
    sampler.set_epoch(1)
    images, labels = load_all(tiny_dataset, sampler, num_workers=0)
    workers_images, workers_labels = load_all(tiny_dataset, sampler, num_workers=2)
    assert torch.equal(images, workers_images) and torch.equal(labels, workers_labels)
    sampler.set_start(8)  # a run interrupted after two batches of four
    resumed_images, resumed_labels = load_all(tiny_dataset, sampler, num_workers=2)
    assert torch.equal(resumed_images, images[8:]) and torch.equal(resumed_labels, labels[8:])


def test_in_memory_accepts_channels_and_rejects_bad_input() -> None:
    rgb = ImageDataset.in_memory(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [0, 1], eval_transform(16, 3), ["a", "b"])
    assert rgb.in_chans == 3 and rgb[SampleKey(0, 1)][0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset.in_memory(torch.zeros(2, 8, 8), [0, 1], None, ["a", "b"])
    with pytest.raises(ValueError, match="one label per image"):
        ImageDataset.in_memory(torch.zeros(2, 8, 8, dtype=torch.uint8), [0], None, ["a", "b"])
    with pytest.raises(ValueError, match=r"0\.\.1"):
        ImageDataset.in_memory(torch.zeros(2, 8, 8, dtype=torch.uint8), [0, 2], None, ["a", "b"])


def test_fashion_mnist_dataset_is_grayscale(fashion_mnist_train: tuple[torch.Tensor, torch.Tensor]) -> None:
    dataset = ImageDataset.in_memory(*fashion_mnist_train, train_transform(28, 1, "compact"), FASHION_MNIST_CLASSES)
    image, label = dataset[SampleKey(0, 0)]
    assert dataset.in_chans == 1 and len(dataset) == 60000
    assert image.shape == (1, 28, 28) and label == 9


# --------------------------------------------------------------------------------------------------- image folders

def save(image: Image.Image, path: Path, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def palette_image_with_transparency() -> Image.Image:
    image = Image.new("P", (12, 10), 0)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.paste(1, (0, 0, 6, 10))
    return image


def exif_rotated_image() -> tuple[Image.Image, Image.Exif]:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide x 20 high, displayed rotated by 90 degrees: 20 wide x 40 high
    return Image.new("RGB", (40, 20), (10, 120, 200)), exif


@pytest.fixture
def mixed_tree(tmp_path: Path) -> Path:
    """root/train/{cat,dog}/ with every mode open_image converts, an EXIF-rotated JPEG and two bad files."""
    split = tmp_path / "train"
    save(Image.new("RGB", (30, 20), (200, 10, 10)), split / "cat" / "rgb.png")
    save(Image.new("L", (16, 16), 77), split / "cat" / "gray.JPG")
    save(Image.new("RGBA", (16, 16), (0, 0, 0, 0)), split / "cat" / "rgba.png")
    save(palette_image_with_transparency(), split / "cat" / "palette.png", transparency=0)
    save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), split / "dog" / "cmyk.jpeg")
    save(Image.new("I;16", (16, 16), 32896), split / "dog" / "sixteen.png")
    rotated, exif = exif_rotated_image()
    save(rotated, split / "dog" / "rotated.jpg", exif=exif.tobytes())
    jpeg = (split / "dog" / "rotated.jpg").read_bytes()
    (split / "dog" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (split / "dog" / "notes.jpg").write_text("not an image\n")
    (split / "dog" / "readme.txt").write_text("ignored: not an image extension\n")
    save(Image.new("RGB", (8, 8)), split / "dog" / ".hidden.png")
    return tmp_path


def test_open_image_converts_every_mode(mixed_tree: Path) -> None:
    folder = mixed_tree / "train"
    assert open_image(folder / "cat" / "rgb.png").getpixel((0, 0)) == (200, 10, 10)
    assert open_image(folder / "cat" / "gray.JPG", "L").mode == "L"
    assert open_image(folder / "cat" / "rgba.png").getpixel((3, 3)) == (255, 255, 255)  # transparent -> white
    palette = open_image(folder / "cat" / "palette.png")
    assert palette.getpixel((0, 0)) == (200, 30, 30) and palette.getpixel((11, 0)) == (255, 255, 255)
    red = open_image(folder / "dog" / "cmyk.jpeg").getpixel((8, 8))  # magenta + yellow ink
    assert red[0] > 235 and red[1] < 20 and red[2] < 20
    assert open_image(folder / "dog" / "sixteen.png", "L").getpixel((0, 0)) == 128  # 32896 / 257
    assert open_image(folder / "dog" / "rotated.jpg").size == (20, 40)
    for name in ("rgb.png", "rgba.png", "palette.png"):
        assert open_image(folder / "cat" / name, "L").mode == "L"


def test_from_folder_loads_every_decodable_file(mixed_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    dataset = ImageDataset.from_folder(mixed_tree, "train", torchvision.transforms.v2.functional.pil_to_tensor)
    assert dataset.classes == ["cat", "dog"] and dataset.in_chans == 3
    assert len(dataset) == 9  # .txt and hidden files are not samples
    shapes = {}
    with caplog.at_level(logging.WARNING, logger="xception.data"):
        for index in range(len(dataset)):
            path = dataset.source.files[index][0]
            sample = dataset[SampleKey(0, index)]
            shapes[path.name] = None if sample is None else tuple(sample[0].shape)
    assert shapes["rotated.jpg"] == (3, 40, 20)
    assert shapes["rgb.png"] == (3, 20, 30) and shapes["gray.JPG"] == (3, 16, 16)
    assert shapes["truncated.jpg"] is None and shapes["notes.jpg"] is None
    assert sum(shape is None for shape in shapes.values()) == 2
    warned = "\n".join(record.getMessage() for record in caplog.records if record.name == "xception.data")
    assert "truncated.jpg" in warned and "notes.jpg" in warned
    deleted = next(index for index, (path, _) in enumerate(dataset.source.files) if path.name == "rgb.png")
    dataset.source.files[deleted][0].unlink()  # a file that vanishes mid-run is skipped too
    assert dataset[SampleKey(0, deleted)] is None


def test_collate_skipping_counts_bad_files_in_a_dataloader(mixed_tree: Path) -> None:
    dataset = ImageDataset.from_folder(mixed_tree, "train", eval_transform(32, 3))
    sampler = ResumableSampler(len(dataset), shuffle=True, seed=0)
    batches = list(DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=collate_skipping))
    assert sum(skipped for _, _, skipped in batches) == 2
    assert sum(len(labels) for _, labels, _ in batches) == 7
    for images, labels, _ in batches:
        assert images.shape == (len(labels), 3, 32, 32) and labels.dtype == torch.int64


def test_collate_skipping_all_bad_batch() -> None:
    images, labels, skipped = collate_skipping([None, None, None])
    assert skipped == 3 and images.numel() == 0 and labels.numel() == 0
    assert images.dtype == torch.float32 and labels.dtype == torch.int64


def test_from_folder_detects_grayscale(tmp_path: Path) -> None:
    save(Image.new("L", (10, 10), 5), tmp_path / "val" / "a" / "one.png")
    save(Image.new("I;16", (10, 10), 1000), tmp_path / "val" / "a" / "two.tif")
    save(Image.new("LA", (10, 10), (5, 255)), tmp_path / "val" / "b" / "three.png")
    (tmp_path / "val" / "b" / "broken.png").write_bytes(b"\x89PNG broken")  # cannot vote
    dataset = ImageDataset.from_folder(tmp_path, "val", eval_transform(12, 1))
    assert dataset.in_chans == 1
    image, label = dataset[SampleKey(0, 0)]
    assert image.shape == (1, 12, 12) and label == 0
    save(Image.new("RGB", (10, 10)), tmp_path / "val" / "b" / "colour.webp")
    assert ImageDataset.from_folder(tmp_path, "val", None).in_chans == 3


def test_from_folder_uses_the_given_class_order(tmp_path: Path) -> None:
    for name in ("apple", "banana"):
        save(Image.new("RGB", (4, 4)), tmp_path / "train" / name / "x.png")
    dataset = ImageDataset.from_folder(tmp_path, "train", eval_transform(4, 3), classes=["banana", "apple"])
    assert dataset.classes == ["banana", "apple"]
    assert {path.parent.name: label for path, label in dataset.source.files} == {"banana": 0, "apple": 1}


def test_from_folder_errors_before_training(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageDataset.from_folder(tmp_path / "missing", "train", None)
    save(Image.new("RGB", (4, 4)), tmp_path / "train" / "cat" / "a.png")
    save(Image.new("RGB", (4, 4)), tmp_path / "train" / "dog" / "b.png")
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'test'.*available splits: train, val"):
        ImageDataset.from_folder(tmp_path, "test", None)
    with pytest.raises(ValueError, match="no class folders"):
        ImageDataset.from_folder(tmp_path, "val", None)
    with pytest.raises(ValueError, match=r"no folder for \['bird'\], folders not in classes \['dog'\]"):
        ImageDataset.from_folder(tmp_path, "train", None, classes=["cat", "bird"])
    with pytest.raises(ValueError, match=r"repeated \['cat'\]"):
        ImageDataset.from_folder(tmp_path, "train", None, classes=["cat", "cat", "dog"])
    (tmp_path / "train" / "eel").mkdir()
    (tmp_path / "train" / "eel" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"without image files.*: eel"):
        ImageDataset.from_folder(tmp_path, "train", None)
    (tmp_path / "val" / "cat").mkdir()
    (tmp_path / "val" / "dog").mkdir()
    with pytest.raises(ValueError, match="contains no image files"):
        ImageDataset.from_folder(tmp_path, "val", None)


# --------------------------------------------------------------------------------------------------- open_image

def test_open_image_refuses_decompression_bombs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(Image.new("RGB", (15, 10)), tmp_path / "warns.png")  # 150 pixels: over the limit, under twice it
    save(Image.new("RGB", (30, 30)), tmp_path / "errors.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for name in ("warns.png", "errors.png"):
        with pytest.raises(ImageError, match=f"{name}.*decompression bomb"):
            open_image(tmp_path / name)


def test_open_image_names_files_it_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "letter.png").write_text("Dear reader,\n")
    with pytest.raises(ImageError, match=r"letter\.png.*not an image"):
        open_image(tmp_path / "letter.png")
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "absent.png")
    with pytest.raises(ValueError, match="mode"):
        open_image(tmp_path / "letter.png", "CMYK")


# --------------------------------------------------------------------------------------------------- transforms

def inputs(in_chans: int) -> list[Image.Image | torch.Tensor]:
    gray = torch.randint(0, 256, (28, 28), dtype=torch.uint8)
    rgb = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    return [gray, gray.unsqueeze(0), rgb, Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("L", (28, 28), 0)]


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 299])
def test_transforms_output_shape_and_range(in_chans: int, size: int) -> None:
    transforms = [train_transform(size, in_chans, "inception"), train_transform(size, in_chans, "compact"),
                  train_transform(size, in_chans, "compact", erasing=1.0), eval_transform(size, in_chans),
                  eval_transform(size, in_chans, resize_ratio=1.14)]
    for transform in transforms:
        for image in inputs(in_chans):
            output = transform(image)
            assert output.shape == (in_chans, size, size) and output.dtype == torch.float32
            assert float(output.min()) >= -1.0 and float(output.max()) <= 1.0


def test_normalization_maps_uint8_extremes_to_minus_one_and_one() -> None:
    image = torch.tensor([[0, 255]], dtype=torch.uint8).expand(28, 2).reshape(28, 2).repeat(1, 14)
    assert eval_transform(28, 1)(image).unique().tolist() == [-1.0, 1.0]


def test_eval_transform_is_deterministic_and_crops_at_a_ratio() -> None:
    transform = eval_transform(32, 3, resize_ratio=1.25)
    image = Image.new("RGB", (80, 40), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 40))  # a white band that the centre crop cuts off
    first = transform(image)
    assert torch.equal(first, transform(image)) and first.shape == (3, 32, 32)
    assert float(first.max()) == -1.0
    squeezed = eval_transform(32, 3)(image)
    assert float(squeezed.max()) == 1.0  # ratio 1.0 resizes the whole image


def test_eval_transform_decodes_pil_images_as_open_image_does(tmp_path: Path) -> None:
    """A PIL image handed to a trained model's transform is decoded like a file: here, turned upright by its EXIF
    orientation (the file is written by PIL)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    ramp = torch.linspace(0, 255, 40 * 20 * 3).reshape(20, 40, 3).to(torch.uint8)  # no symmetry: rotation shows
    path = save(Image.fromarray(ramp.numpy()), tmp_path / "rotated.jpg", exif=exif.tobytes())
    transform = eval_transform(16, 3, resize_ratio=1.25)
    upright = open_image(path)
    assert upright.size == (20, 40)
    with Image.open(path) as image:
        assert torch.equal(transform(image), transform(upright))
        stored = image.transpose(Image.Transpose.ROTATE_90)  # any other orientation gives other pixels
        del stored.info["exif"]
        assert not torch.equal(transform(stored), transform(upright))


def test_compact_leaves_small_images_recognisable() -> None:
    image = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    output = train_transform(28, 1, "compact")(image)
    assert int((output == 1.0).sum()) >= 24 * 24  # at most 4 rows and columns of padding come in


def test_transforms_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="style"):
        train_transform(28, 1, "autoaugment")
    with pytest.raises(ValueError, match="in_chans"):
        eval_transform(28, 4)
    with pytest.raises(ValueError, match="resize_ratio"):
        eval_transform(28, 1, resize_ratio=0.5)
    with pytest.raises(ValueError, match="uint8"):
        eval_transform(28, 1)(torch.zeros(28, 28))


def test_subset_by_name_and_index_renumbers_and_keeps_names() -> None:
    images = torch.arange(12, dtype=torch.uint8).view(12, 1, 1).expand(12, 4, 4).contiguous()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    dataset = ImageDataset.in_memory(images, labels, eval_transform(4, 1), ["cat", "dog", "fox"])
    subset = dataset.subset(["fox", "0"], per_class=2)
    assert subset.classes == ["fox", "cat"]
    assert subset.source.label_list() == [1, 0, 1, 0]  # cat 0, fox 2, cat 3, fox 5 -> cat 1, fox 0
    assert subset.source.images[:, 0, 0, 0].tolist() == [0, 2, 3, 5]
    with pytest.raises(xception.XceptionError, match=r"unknown class 'owl': the data's classes are cat, dog, fox"):
        dataset.subset(["owl"])
    with pytest.raises(xception.XceptionError, match=r"class index 7 is out of range: the data has 3 classes"):
        dataset.subset([7])


def test_spread_takes_evenly_spaced_samples_of_every_class(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):  # a folder lists its files class by class
        (tmp_path / "val" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "val" / name / f"{i}.png")
    dataset = ImageDataset.from_folder(tmp_path, "val", eval_transform(8, 1))
    spread = dataset.spread(4)  # of 12: files 0, 4, 7, 11
    assert spread.classes == dataset.classes and len(spread) == 4
    assert [(path.parent.name, path.name) for path, _ in spread.source.files] == [
        ("a", "0.png"), ("b", "0.png"), ("b", "3.png"), ("c", "3.png")]
    assert spread.source.label_list() == [0, 1, 1, 2]
    assert dataset.spread(12) is dataset and dataset.spread(50) is dataset


def test_subset_of_a_folder(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "train" / name / f"{i}.png")
    dataset = ImageDataset.from_folder(tmp_path, "train", eval_transform(8, 1))
    subset = dataset.subset(["c", "a"], per_class=1)
    assert subset.classes == ["c", "a"] and len(subset) == 2
    assert [path.parent.name for path, _ in subset.source.files] == ["a", "c"]
    assert subset.source.label_list() == [1, 0]
