"""save_pretrained / from_pretrained / push: bit-exact round trips of every registered model, a custom
configuration and a training run, locally and through a local stand-in for the Hugging Face Hub; the model card's
metadata; pushing with a mocked HfApi. No network."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from http_server import HubStandIn, serve_hub
from PIL import Image
from torch import nn

import xception
from xception.cli import main
from xception.data import FASHION_MNIST_CLASSES, eval_transform, load_fashion_mnist
from xception.deploy import read_record
from xception.errors import InvalidArgumentError, WeightFileError
from xception.hardware import simulate
from xception.hub import run_metrics
from xception.training import TrainConfig, train
from xception.training.checkpoint import read_architecture

TINY = {"stem_widths": (8, 16), "entry_widths": (16, 32), "middle_repeats": 0, "exit_widths": (32, 48),
        "tail_widths": (48, 64)}
SMALL_INPUT = (1, 3, 72, 72)  # small: every model of the family takes 71x71 and up
# Full output checks for these; the others (40M parameters and more) compare state dicts only, to stay fast.
OUTPUT_CHECKED = {"xception", "xception41", "xception41p", "deeplabv3plus_xception", "deeplabv3_xception"}
CLASSIFICATION = xception.list_models("classification")
pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: extra threads only contend on a busy CPU
SEGMENTATION = xception.list_models("segmentation")


@pytest.fixture(autouse=True)
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache of the test's own, online mode, no endpoint or token from the environment."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for name in ("HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")
    return cache


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandIn]:
    with serve_hub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.base_url)
        yield hub


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) training run on Fashion-MNIST: two epochs of a narrow network on 64 images."""
    output = tmp_path_factory.mktemp("run")
    train(TrainConfig(output=output, model_options=TINY, epochs=2, batch_size=32, lr=0.4, train_subset=64,
                      val_subset=200, progress=False))
    return output


def assert_same_state(actual: nn.Module, expected: nn.Module) -> None:
    a, b = actual.state_dict(), expected.state_dict()
    assert list(a) == list(b)
    for name, tensor in b.items():
        assert torch.equal(a[name], tensor), name


@torch.no_grad()
def outputs(model: nn.Module, shape: tuple[int, ...] = SMALL_INPUT) -> torch.Tensor:
    return model.eval()(torch.rand(*shape, generator=torch.Generator().manual_seed(1)) * 2 - 1)


def front_matter(folder: Path) -> dict[str, Any]:
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def publish_folder(stand_in: HubStandIn, repo: str, folder: Path) -> str:
    return stand_in.publish(repo, {path.name: path.read_bytes() for path in folder.iterdir()})


# --- round trips ----------------------------------------------------------------------------------------------

def round_trip(model: nn.Module, folder: Path) -> nn.Module:
    xception.save_pretrained(model, folder)
    assert sorted(path.name for path in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = xception.from_pretrained(folder)
    assert_same_state(loaded, model)
    assert not loaded.training
    return loaded


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_every_classification_model_round_trips(name: str, tmp_path: Path) -> None:
    model = xception.create_model(name, num_classes=5)
    loaded = round_trip(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"] == name and config["architecture"] == json.loads(json.dumps(model.architecture()))
    assert front_matter(tmp_path)["pipeline_tag"] == "image-classification"
    if name in OUTPUT_CHECKED:
        assert torch.equal(outputs(loaded), outputs(model))


@pytest.mark.parametrize("name", [pytest.param(name, marks=() if name in OUTPUT_CHECKED else pytest.mark.slow)
                                  for name in SEGMENTATION])
def test_every_segmentation_model_round_trips(name: str, tmp_path: Path) -> None:
    model = xception.create_model(name, num_classes=4)
    loaded = round_trip(model, tmp_path)
    metadata = front_matter(tmp_path)
    assert metadata["pipeline_tag"] == "image-segmentation" and name in metadata["tags"]
    assert torch.equal(outputs(loaded), outputs(model))


def test_custom_configuration_round_trips(tmp_path: Path) -> None:
    model = xception.create_model("xception", middle_repeats=1, segments=4, num_classes=7)
    model.train()(torch.rand(4, 3, 96, 96))  # BatchNorm statistics that are not the defaults
    loaded = round_trip(model, tmp_path)
    architecture = loaded.pretrained_config.architecture
    assert (architecture["middle_repeats"], architecture["segments"], architecture["num_classes"]) == (1, 4, 7)
    assert torch.equal(outputs(loaded), outputs(model))
    assert loaded.pretrained_config.transforms() is None  # a bare model records no preprocessing


# --- a training run ---------------------------------------------------------------------------------------------

def test_training_run_saves_with_its_classes_preprocessing_and_best_result(run_dir: Path, tmp_path: Path) -> None:
    folder = xception.save_pretrained(run_dir, tmp_path / "shared")
    config = json.loads((folder / "config.json").read_text())
    run_config = json.loads((run_dir / "config.json").read_text())
    assert config["classes"] == list(FASHION_MNIST_CLASSES) == run_config["classes"]
    assert config["preprocessing"]["crop_size"] == 28 and config["preprocessing"]["mean"] == [0.5]
    assert config["library_version"] == xception.__version__

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = max((r for r in records if "val_top1" in r), key=lambda r: r["val_top1"])
    top1 = next(m for m in config["metrics"] if m["name"] == "top-1 accuracy (%)")
    assert top1["value"] == round(100 * best["val_top1"], 2)
    assert top1["dataset_id"] == "zalando-datasets/fashion_mnist" and top1["split"] == "test"
    assert f"best epoch ({best['epoch']})" in top1["source"] and "first 200 images" in top1["source"]

    metadata = front_matter(folder)
    assert metadata["library_name"] == "xception" and metadata["pipeline_tag"] == "image-classification"
    assert metadata["datasets"] == ["zalando-datasets/fashion_mnist"]
    result = metadata["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "accuracy", "value": top1["value"], "name": "top-1 accuracy (%)"}
    assert "xception.from_pretrained(" in (folder / "README.md").read_text()

    name, architecture = read_architecture(run_dir / "best.safetensors")
    trained = xception.create_model(name, weights=run_dir / "best.safetensors", **architecture)
    loaded = xception.from_pretrained(folder)
    assert_same_state(loaded, trained)
    assert torch.equal(outputs(loaded, (3, 1, 28, 28)), outputs(trained, (3, 1, 28, 28)))
    image = torch.from_numpy(load_fashion_mnist("test")[0][0].numpy())
    assert torch.equal(loaded.pretrained_config.transforms()(image), eval_transform(28, 1)(image))


def test_saved_model_saves_again_with_its_metadata(run_dir: Path, tmp_path: Path) -> None:
    first = xception.save_pretrained(run_dir, tmp_path / "first")
    again = xception.save_pretrained(first, tmp_path / "again")  # a save_pretrained folder as the source
    assert json.loads((again / "config.json").read_text()) == json.loads((first / "config.json").read_text())
    weights = [safetensors.torch.load_file(folder / "model.safetensors") for folder in (first, again)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_segmentation_run_reports_its_best_miou(tmp_path: Path) -> None:
    """The epoch records of a segmentation run, with the keys its task logs (val_miou, val_pixel_accuracy:
    xception/training/segmentation.py); the best epoch is the one of the best mIoU, not the last."""
    records = [{"epoch": 1, "step": 10, "val_loss": 1.2, "val_miou": 0.31, "val_pixel_accuracy": 0.72},
               {"step": 15, "train_loss": 0.9, "lr": 0.01},
               {"epoch": 2, "step": 20, "val_loss": 1.0, "val_miou": 0.456789, "val_pixel_accuracy": 0.8},
               {"epoch": 3, "step": 30, "val_loss": 1.1, "val_miou": 0.40, "val_pixel_accuracy": 0.83}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + '{"epoch": 4, "val_')  # killed run
    metrics = run_metrics(path, "my-scenes", None, "val", None)
    assert [(m["name"], m["type"], m["value"]) for m in metrics] == [("mIoU (%)", "mean_iou", 45.68),
                                                                     ("pixel accuracy (%)", "accuracy", 80.0)]
    assert "best epoch (2)" in metrics[0]["source"]


def test_registered_weights_bring_classes_preprocessing_license_and_published_results(tmp_path: Path) -> None:
    model = xception.create_model("xception")
    model.pretrained_weights = xception.get_weights("xception", "imagenet")  # as load_weights leaves it
    xception.save_pretrained(model, tmp_path)
    config = xception.from_pretrained(tmp_path).pretrained_config
    assert len(config.classes) == 1000 and config.classes[0] == "tench"
    assert config.license == "mit" and config.datasets == ("imagenet-1k",)
    assert config.base_model == "xception.imagenet"
    assert [(m["name"], m["value"]) for m in config.metrics] == [("top-1 accuracy (%)", 79.0),
                                                                  ("top-5 accuracy (%)", 94.5)]
    assert config.metrics[0]["source"].startswith("as published")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8))
    assert torch.equal(config.transforms()(image), model.pretrained_weights.transforms()(image))
    assert front_matter(tmp_path)["license"] == "mit"


# --- through the Hub ----------------------------------------------------------------------------------------------

def test_hub_repository_loads_as_a_model_and_as_weights_pinned_by_revision(run_dir: Path, tmp_path: Path,
                                                                          stand_in: HubStandIn) -> None:
    folder = xception.save_pretrained(run_dir, tmp_path / "shared", repo_id="me/fashion")
    first = publish_folder(stand_in, "me/fashion", folder)
    other = xception.create_model(json.loads((folder / "config.json").read_text())["model"],
                                  **xception.from_pretrained(folder).pretrained_config.architecture)
    xception.save_pretrained(other, tmp_path / "other")
    publish_folder(stand_in, "me/fashion", tmp_path / "other")

    latest = xception.from_pretrained("hf-hub:me/fashion")
    pinned = xception.from_pretrained(f"hf-hub:me/fashion@{first}")
    assert_same_state(latest, other)
    assert_same_state(pinned, xception.from_pretrained(folder))
    assert pinned.pretrained_config.classes == tuple(FASHION_MNIST_CLASSES)
    requests = len(stand_in.requests)
    xception.from_pretrained(f"hf-hub:me/fashion@{first}")  # a commit in the cache: no request
    assert len(stand_in.requests) == requests
    # The same repository as weights for a model built otherwise
    as_weights = xception.create_model("xception", **pinned.pretrained_config.architecture,
                                       weights=f"hf-hub:me/fashion@{first}")
    assert_same_state(as_weights, pinned)
    assert "hf-hub:me/fashion" in (folder / "README.md").read_text()


def test_training_starts_from_hub_weights(run_dir: Path, tmp_path: Path, stand_in: HubStandIn) -> None:
    """xception train --weights hf-hub:...: the run's model starts from the repository's weights, in the
    repository's architecture (no --model or --set needed, as for a run folder)."""
    from xception.training.finetune import build_model

    folder = xception.save_pretrained(run_dir, tmp_path / "shared")
    publish_folder(stand_in, "me/fashion", folder)
    config = TrainConfig(output=tmp_path / "again", weights="hf-hub:me/fashion", epochs=1,
                         batch_size=32, train_subset=64, val_subset=64, progress=False)
    started = build_model(config.weights, config.resolved_recipe(), {}, num_classes=10, in_chans=1)
    assert_same_state(started, xception.from_pretrained(folder))
    local = build_model(str(folder), config.resolved_recipe(), {}, num_classes=10, in_chans=1)
    assert_same_state(local, started)
    assert train(config)["epochs"] == 1


def test_predict_with_hub_weights(run_dir: Path, tmp_path: Path, stand_in: HubStandIn,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = xception.save_pretrained(run_dir, tmp_path / "shared")
    publish_folder(stand_in, "me/fashion", folder)
    image = tmp_path / "0.png"
    Image.fromarray(load_fashion_mnist("test")[0][0].numpy()).save(image)
    with simulate(cpu_bf16=False):  # the weights as loaded (fp32), on any CPU: the same numbers from each source
        assert main(["predict", "--weights", "hf-hub:me/fashion", str(image), "--json", "--top-k", "2"]) == 0
        from_hub = json.loads(capsys.readouterr().out)
        assert main(["predict", "--checkpoint", str(run_dir), str(image), "--json", "--top-k", "2"]) == 0
        from_run = json.loads(capsys.readouterr().out)
        assert main(["predict", "--checkpoint", str(folder), str(image), "--json", "--top-k", "2"]) == 0
        from_folder = json.loads(capsys.readouterr().out)
    assert from_hub["predictions"] == from_run["predictions"] == from_folder["predictions"]
    assert from_hub["predictions"][0]["class"] in FASHION_MNIST_CLASSES

    # deploy --weights: a Hub repository names no data folder of its own, so the calibration data is asked for.
    assert main(["deploy", "--weights", "hf-hub:me/fashion", "--output", str(tmp_path / "x")]) == 2
    assert "give --calibration DATA" in capsys.readouterr().err
    deployed = tmp_path / "deployed"
    assert main(["deploy", "--weights", "hf-hub:me/fashion", "--calibration", "fashion-mnist", "--candidates",
                 "torch fp32", "--calibration-images", "16", "--held-out-images", "20", "--repeats", "1",
                 "--output", str(deployed)]) == 0
    assert "chosen: torch fp32" in capsys.readouterr().out
    assert read_record(deployed)["source"] == "xception hf-hub:me/fashion"
    assert main(["predict", "--deployed", str(deployed), str(image), "--json", "--top-k", "2"]) == 0
    from_deployed = json.loads(capsys.readouterr().out)["predictions"]
    assert [p["class"] for p in from_deployed] == [p["class"] for p in from_hub["predictions"]]


# --- push ---------------------------------------------------------------------------------------------------------

class FakeHfApi:
    """Records what push_to_hub asks of huggingface_hub's HfApi, and the folder it uploads (which is temporary)."""

    calls: ClassVar[list[tuple[str, tuple, dict]]] = []
    uploaded: ClassVar[dict[str, bytes]] = {}

    def __init__(self, token: str | None = None, **_kwargs: Any) -> None:
        FakeHfApi.calls.append(("init", (), {"token": token}))

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        FakeHfApi.calls.append(("create_repo", (repo_id,), kwargs))
        return f"https://hub.invalid/{repo_id}"

    def create_branch(self, repo_id: str, **kwargs: Any) -> None:
        FakeHfApi.calls.append(("create_branch", (repo_id,), kwargs))

    def upload_folder(self, **kwargs: Any) -> Any:
        FakeHfApi.calls.append(("upload_folder", (), kwargs))
        FakeHfApi.uploaded = {path.name: path.read_bytes() for path in Path(kwargs["folder_path"]).iterdir()}

        class Info:
            commit_url = f"https://hub.invalid/{kwargs['repo_id']}/commit/1234"

        return Info()


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> type[FakeHfApi]:
    import huggingface_hub

    FakeHfApi.calls, FakeHfApi.uploaded = [], {}
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def test_push_uploads_the_run_with_its_card(run_dir: Path, fake_api: type[FakeHfApi], monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    code = main(["push", str(run_dir), "me/fashion", "--private", "--revision", "dev", "--commit-message", "first"])
    assert code == 0
    calls = {name: (args, kwargs) for name, args, kwargs in fake_api.calls}
    assert calls["init"][1] == {"token": "hf_test_token"}
    assert calls["create_repo"] == (("me/fashion",), {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["create_branch"][1]["branch"] == "dev"
    upload = calls["upload_folder"][1]
    assert (upload["repo_id"], upload["revision"], upload["commit_message"]) == ("me/fashion", "dev", "first")
    assert sorted(fake_api.uploaded) == ["README.md", "config.json", "model.safetensors"]
    assert "xception.from_pretrained('hf-hub:me/fashion')" in fake_api.uploaded["README.md"].decode()
    assert json.loads(fake_api.uploaded["config.json"])["classes"] == list(FASHION_MNIST_CLASSES)
    assert "https://hub.invalid/me/fashion/commit/1234" in capsys.readouterr().out
    assert not Path(upload["folder_path"]).exists()  # the temporary folder is gone


def test_push_without_a_token_says_how_to_log_in(run_dir: Path, fake_api: type[FakeHfApi],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", str(run_dir), "me/fashion"]) == 2
    error = capsys.readouterr().err
    assert "needs a Hugging Face token" in error and "hf auth login" in error and "HF_TOKEN" in error
    assert fake_api.calls == []


# --- refusals -------------------------------------------------------------------------------------------------------

def test_training_run_is_not_a_pretrained_folder(run_dir: Path) -> None:
    with pytest.raises(WeightFileError, match=r"is a training run.*--checkpoint.*save_pretrained\(run_dir"):
        xception.from_pretrained(run_dir)


def test_folder_of_another_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "xception41", "num_classes": 5}))
    with pytest.raises(WeightFileError, match="not an xception pretrained-model config"):
        xception.from_pretrained(tmp_path)


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    model = xception.create_model("xception", **TINY, num_classes=3)
    with pytest.raises(InvalidArgumentError, match="format must be one of xception, timm"):
        xception.save_pretrained(model, tmp_path / "a", format="onnx")
    with pytest.raises(InvalidArgumentError, match="mean and std"):
        xception.save_pretrained(model, tmp_path / "b", preprocessing={"crop_size": 28, "mean": [0.5, 0.5]})
    with pytest.raises(InvalidArgumentError, match="not Linear"):
        xception.save_pretrained(nn.Linear(2, 2), tmp_path / "c")
    with pytest.raises(InvalidArgumentError, match="hf-hub:org/name"):
        xception.from_pretrained("hf-hub:not/a/repo")
    assert list(tmp_path.iterdir()) == []


def test_timm_format_writes_a_folder_timm_loads(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    model = xception.create_model("xception41", num_classes=5).eval()
    xception.save_pretrained(model, tmp_path, format="timm")
    theirs = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert torch.equal(outputs(theirs, (1, 3, 64, 64)), outputs(model, (1, 3, 64, 64)))
