"""Training checkpoints: exact resumption, types kept, weights usable on their own, atomic writes, no pickle."""

import copy
import json
import math
import os
import pickle
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import xception
import xception.training.checkpoint as checkpoint_module
from xception.training.checkpoint import (
    CheckpointError,
    TrainingState,
    capture_rng_state,
    finish_interrupted_save,
    flatten_state,
    load_checkpoint,
    read_architecture,
    restore_rng_state,
    save_checkpoint,
    unflatten_state,
)
from xception.weights.formats import read_safetensors_metadata

ARCHITECTURE = {"tiny": True, "drop": 0.3}


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.dropout = nn.Dropout(0.3)  # draws from the global generator: resumption must restore it
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean(dim=(2, 3)))


OPTIMIZERS = {
    "sgd": lambda p: (opt := torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
                      torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)),
    "rmsprop": lambda p: (opt := torch.optim.RMSprop(p, lr=0.01, momentum=0.9),
                          torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)),
    "adamw": lambda p: (opt := torch.optim.AdamW(p, lr=0.01),
                        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))),
}


@dataclass
class Run:
    model: TinyNet
    ema: TinyNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def make_run(kind: str) -> Run:
    model = TinyNet()
    optimizer, scheduler = OPTIMIZERS[kind](model.parameters())
    return Run(model, copy.deepcopy(model), optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))


def train_step(run: Run) -> None:
    # Data and augmentation from all three global generators.
    x = torch.randn(8, 3, 8, 8) * float(np.random.uniform(0.5, 1.5)) + random.gauss(0, 1)
    y = torch.randint(0, 10, (8,))
    run.optimizer.zero_grad()
    run.scaler.scale(F.cross_entropy(run.model(x), y)).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    with torch.no_grad():
        for average, live in zip(run.ema.state_dict().values(), run.model.state_dict().values(), strict=True):
            if average.is_floating_point():
                average.lerp_(live, 0.25)
            else:
                average.copy_(live)


def snapshot(run: Run) -> dict[str, torch.Tensor]:
    tensors = {f"model/{k}": v.clone() for k, v in run.model.state_dict().items()}
    tensors.update({f"ema/{k}": v.clone() for k, v in run.ema.state_dict().items()})
    for index, state in run.optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer/{index}/{k}": v.clone() for k, v in state.items()})
    return tensors


def training_state(run: Run, *, step: int, epoch: int = 0, position: int = 0, extra: dict | None = None,
                   best_score: float | None = None) -> TrainingState:
    return TrainingState(epoch=epoch, step=step, position=position, best_score=best_score,
                         model=run.model.state_dict(), ema=run.ema.state_dict(),
                         optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                         grad_scaler=run.scaler.state_dict(), rng=capture_rng_state(),
                         extra={"history": [{"epoch": 0, "top1": 12.5}]} if extra is None else extra)


def save(run: Run, directory: Path, name: str = "last", **kwargs) -> Path:
    return save_checkpoint(directory, name, training_state(run, **kwargs), architecture=ARCHITECTURE,
                           model_name="tinynet")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def assert_same_tree(actual, expected, where: str = "") -> None:
    """Equal values of exactly the same types, tensors equal in dtype, shape and bits, nan equal to nan."""
    assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and np.array_equal(actual, expected), where
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same_tree(actual[key], expected[key], f"{where}/{key!r}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_tree(a, e, f"{where}/{index}")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), where
    else:
        assert actual == expected, where
        if isinstance(expected, float):
            assert math.copysign(1, actual) == math.copysign(1, expected), where


def test_checkpoints_from_before_segmentation_name_the_best_score_best_top1(tmp_path):
    """The state's JSON called the best validation score "best_top1" until segmentation (scored by mIoU) came; such
    checkpoints still load, their value as best_score."""
    run = make_run("sgd")
    save(run, tmp_path, step=2, best_score=0.75)
    state_path = tmp_path / "last.state.safetensors"
    with safe_open(str(state_path), "pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (safe_open has no iterator)
    skeleton = json.loads(metadata["state"])
    skeleton["best_top1"] = skeleton.pop("best_score")
    save_file(tensors, str(state_path), metadata={**metadata, "state": json.dumps(skeleton)})
    assert load_checkpoint(tmp_path, "last").best_score == 0.75


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_resume_is_bit_identical(tmp_path, kind):
    seed_everything(1)
    run = make_run(kind)
    for _ in range(3):
        train_step(run)
    saved = copy.deepcopy({"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                           "scaler": run.scaler.state_dict()})
    save(run, tmp_path, step=3, epoch=1, position=24, best_score=55.5)
    expected = []
    for _ in range(3):
        train_step(run)
        expected.append(snapshot(run))
    expected_draws = (torch.rand(3), np.random.rand(3), random.random())

    seed_everything(99)  # another initialisation and another place in every generator
    resumed = make_run(kind)
    state = load_checkpoint(tmp_path, "last")
    assert (state.epoch, state.step, state.position, state.best_score) == (1, 3, 24, 55.5)
    assert state.extra == {"history": [{"epoch": 0, "top1": 12.5}]}
    assert_same_tree(state.optimizer, saved["optimizer"], "optimizer")  # int keys, tuples, 0-dim steps...
    assert_same_tree(state.scheduler, saved["scheduler"], "scheduler")
    assert state.grad_scaler == saved["scaler"] == {}
    resumed.model.load_state_dict(state.model)
    resumed.ema.load_state_dict(state.ema)
    resumed.optimizer.load_state_dict(state.optimizer)
    resumed.scheduler.load_state_dict(state.scheduler)
    resumed.scaler.load_state_dict(state.grad_scaler)
    restore_rng_state(state.rng)
    for step, want in enumerate(expected):
        train_step(resumed)
        got = snapshot(resumed)
        assert list(got) == list(want)
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), f"step {step}: {key}"
    assert resumed.scheduler.get_last_lr() == run.scheduler.get_last_lr()
    draws = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], expected_draws[0]) and np.array_equal(draws[1], expected_draws[1])
    assert draws[2] == expected_draws[2]


def test_structure_round_trip_keeps_types(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    awkward = {
        "state": {0: {"step": torch.tensor(7.0), "buf": base.t()}, 1: {"buf": base[:, 1]}},  # views of one storage
        "3": "string key next to the int key 3", 3: ("tuple", (1, 2.0), [None, True]),
        "floats": [math.inf, -math.inf, math.nan, -0.0, 1e-310, 0.1, 1.0, 2**70],
        "dtypes": [torch.ones(2, dtype=torch.bfloat16), torch.tensor([True, False]), torch.zeros(0, 5),
                   torch.tensor(3, dtype=torch.int64), torch.arange(4, dtype=torch.uint8)],
        "marker-like": {"__tensor__": "not a tensor"}, "nested": {(1, "a"): 2, None: 3, 2.5: 4, False: 5},
        "array": np.arange(5, dtype=np.int32), "scalars": [np.float64(0.5)],
    }
    skeleton, tensors = flatten_state(awkward)
    json.dumps(skeleton, allow_nan=False)  # plain JSON
    assert all(t.is_contiguous() for t in tensors.values())
    assert "state/0/buf" in tensors and tensors["state/0/buf"].untyped_storage().data_ptr() != base.data_ptr()
    expected = copy.deepcopy(awkward)
    expected["scalars"] = [0.5]  # NumPy scalars come back as Python numbers
    assert_same_tree(unflatten_state(skeleton, tensors), expected)

    # The same through files, with ReduceLROnPlateau's infinities and an enabled GradScaler's state.
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state = TrainingState(epoch=0, step=0, position=0, best_score=None, model={"w": torch.zeros(2)}, ema=None,
                          optimizer=awkward, scheduler=plateau.state_dict(), grad_scaler=scaler.state_dict(),
                          rng=capture_rng_state(), extra={"config": {"lr": 0.1, "betas": [0.9, 0.999]}})
    save_checkpoint(tmp_path, "last", state, architecture={}, model_name="x")
    loaded = load_checkpoint(tmp_path)
    assert_same_tree(loaded.optimizer, expected)
    assert_same_tree(loaded.scheduler, plateau.state_dict())
    assert loaded.scheduler["best"] == math.inf
    fresh_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD([nn.Parameter(torch.zeros(1))]))
    fresh_plateau.load_state_dict(loaded.scheduler)
    assert_same_tree(fresh_plateau.state_dict(), plateau.state_dict())
    fresh_scaler = torch.amp.GradScaler("cpu")
    fresh_scaler.load_state_dict(loaded.grad_scaler)
    assert fresh_scaler.state_dict() == scaler.state_dict()
    assert loaded.ema is None and loaded.best_score is None


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.gauss(0, 1)  # a cached second Gaussian in both Python and NumPy
    np.random.randn()
    rng = capture_rng_state()
    draws = (torch.rand(4), np.random.randn(4), random.gauss(0, 1), random.random())
    model = {"w": torch.zeros(1)}
    state = TrainingState(0, 0, 0, None, model, None, {}, None, None, rng, {})
    save_checkpoint(tmp_path, "last", state, architecture={}, model_name="x")
    torch.rand(10), np.random.rand(10), random.random()
    restore_rng_state(load_checkpoint(tmp_path).rng)
    again = (torch.rand(4), np.random.randn(4), random.gauss(0, 1), random.random())
    assert torch.equal(again[0], draws[0]) and np.array_equal(again[1], draws[1]) and again[2:] == draws[2:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_state_round_trips(tmp_path):
    torch.cuda.init()
    rng = capture_rng_state()
    assert len(rng["cuda"]) == torch.cuda.device_count()
    draw = torch.rand(4, device="cuda")
    save_checkpoint(tmp_path, "last", TrainingState(0, 0, 0, None, {"w": torch.zeros(1)}, None, {}, None, None, rng,
                                                    {}), architecture={}, model_name="x")
    torch.rand(4, device="cuda")
    restore_rng_state(load_checkpoint(tmp_path).rng)
    assert torch.equal(torch.rand(4, device="cuda"), draw)


def test_weights_file_loads_into_an_xception_model(tmp_path):
    model = xception.create_model("xception", middle_repeats=0, num_classes=10)
    state = TrainingState(epoch=2, step=10, position=0, best_score=1.0, model=model.state_dict(), ema=None,
                          optimizer={}, scheduler=None, grad_scaler=None, rng=capture_rng_state(), extra={})
    path = save_checkpoint(tmp_path, "best", state, architecture=model.architecture(), model_name=model.model_name)
    assert path == tmp_path / "best.safetensors"

    torch.manual_seed(1)
    fresh = xception.create_model("xception", middle_repeats=0, num_classes=10)
    assert not torch.equal(fresh.head.predictions.weight, model.head.predictions.weight)
    assert xception.load_weights(fresh, path) == "xception safetensors"
    for (name, want), got in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(got, want), name

    name, architecture = read_architecture(path)
    assert (name, architecture) == ("xception", json.loads(json.dumps(model.architecture())))
    assert architecture["middle_repeats"] == 0
    assert read_architecture(tmp_path) == (name, architecture)  # a run folder: its best checkpoint
    rebuilt = xception.create_model(name, weights=path, **architecture)
    assert torch.equal(rebuilt.head.predictions.weight, model.head.predictions.weight)

    # The metadata save_weights writes, exactly, plus the checkpoint's own entries.
    plain = read_safetensors_metadata(xception.save_weights(model, tmp_path / "plain.safetensors"))
    ours = read_safetensors_metadata(path)
    assert {key: ours[key] for key in plain} == plain
    assert set(ours) - set(plain) == {"checkpoint_id", "checkpoint_step", "checkpoint_epoch", "checkpoint_saved_at",
                                      "checkpoint_sha256"}


def test_read_architecture_of_run_folders_and_files(tmp_path):
    run = make_run("sgd")
    with pytest.raises(CheckpointError, match=r"neither best\.safetensors nor last\.safetensors"):
        read_architecture(tmp_path)
    save(run, tmp_path, "last", step=1)
    assert read_architecture(tmp_path) == ("tinynet", ARCHITECTURE)
    save_checkpoint(tmp_path, "best", training_state(run, step=1), architecture={"which": "best"},
                    model_name="tinynet")
    assert read_architecture(tmp_path) == ("tinynet", {"which": "best"})
    assert read_architecture(tmp_path / "last.safetensors") == ("tinynet", ARCHITECTURE)
    with pytest.raises(CheckpointError, match=r"use .*last\.safetensors"):
        read_architecture(tmp_path / "last.state.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_architecture(tmp_path / "nothing.safetensors")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="no architecture"):
        read_architecture(tmp_path / "foreign.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_architecture(tmp_path / "junk.safetensors")


# --- atomicity -------------------------------------------------------------------------------------

def good_checkpoint(tmp_path: Path) -> tuple[Run, dict[str, torch.Tensor]]:
    seed_everything(0)
    run = make_run("sgd")
    train_step(run)
    save(run, tmp_path, step=1)
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    train_step(run)  # the next checkpoint would differ
    return run, weights


def assert_good_checkpoint_intact(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    assert sorted(os.listdir(tmp_path)) == ["last.safetensors", "last.state.safetensors"]  # no temporaries
    state = load_checkpoint(tmp_path)
    assert state.step == 1
    assert all(torch.equal(state.model[k], v) for k, v in weights.items())


@pytest.mark.parametrize("failing_write", [0, 1], ids=["state-file", "weights-file"])
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing_write):
    run, weights = good_checkpoint(tmp_path)
    calls = []

    def half_write(tensors, filename, metadata=None):
        calls.append(filename)
        save_file(tensors, filename, metadata=metadata)
        if len(calls) - 1 == failing_write:
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", half_write)
    with pytest.raises(CheckpointError, match=r"No space left on device.*previous checkpoint .* is unchanged"):
        save(run, tmp_path, step=2)
    assert all(Path(name).parent == tmp_path and ".tmp-" in Path(name).name for name in calls)
    assert_good_checkpoint_intact(tmp_path, weights)


@pytest.mark.parametrize("failure", ["fsync", "first-rename", "interrupt"])
def test_failure_before_commit_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    run, weights = good_checkpoint(tmp_path)
    if failure == "fsync":
        def fail(*args):
            raise OSError(5, "Input/output error")
        monkeypatch.setattr(os, "fsync", fail)
    elif failure == "first-rename":
        def fail(*args):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(os, "replace", fail)
    else:
        def fail(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(checkpoint_module, "save_file", fail)
    with pytest.raises((CheckpointError, KeyboardInterrupt)):
        save(run, tmp_path, step=2)
    monkeypatch.undo()
    assert_good_checkpoint_intact(tmp_path, weights)


def test_crash_between_the_renames_is_detected(tmp_path, monkeypatch):
    run, _ = good_checkpoint(tmp_path)
    real_replace, renamed = os.replace, []

    def crash_on_second(source, destination):
        if renamed:
            raise OSError(5, "simulated crash")
        renamed.append(destination)
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(CheckpointError, match="half written"):
        save(run, tmp_path, step=2)
    monkeypatch.undo()
    assert renamed == [tmp_path / "last.state.safetensors"]  # the state file goes first
    with pytest.raises(CheckpointError, match=r"last\.safetensors is stale.*step 1.*step 2") as error:
        load_checkpoint(tmp_path)
    assert "last.state.safetensors is stale" not in str(error.value)
    # The message names the complete new weights file; renaming it finishes the save.
    leftover = next(tmp_path.glob("last.safetensors.tmp-*"))
    assert str(leftover) in str(error.value)
    assert read_architecture(tmp_path) == ("tinynet", ARCHITECTURE)  # the weights file alone stays usable
    assert finish_interrupted_save(tmp_path)  # what a resumed run does first: the rename the crash missed
    assert not leftover.exists() and not finish_interrupted_save(tmp_path)  # done once; a good pair is left alone
    state = load_checkpoint(tmp_path)
    assert state.step == 2
    assert all(torch.equal(state.model[k], v) for k, v in run.model.state_dict().items())


def test_a_first_save_killed_between_the_renames_is_finished(tmp_path, monkeypatch):
    seed_everything(0)
    run = make_run("sgd")
    real_replace = os.replace

    def crash_on_weights(source, destination):
        if Path(destination).name == "last.safetensors":
            raise OSError(5, "simulated crash")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", crash_on_weights)
    with pytest.raises(CheckpointError, match="half written"):
        save(run, tmp_path, step=1)
    monkeypatch.undo()
    assert not (tmp_path / "last.safetensors").exists()
    assert finish_interrupted_save(tmp_path) and load_checkpoint(tmp_path).step == 1


def test_finishing_leaves_anything_else_to_load_checkpoint(tmp_path):
    assert not finish_interrupted_save(tmp_path)  # no checkpoint at all
    run, _ = good_checkpoint(tmp_path)
    old_state = (tmp_path / "last.state.safetensors").read_bytes()
    save(run, tmp_path, step=2)
    (tmp_path / "last.state.safetensors").write_bytes(old_state)  # a stale state file: no rename can fix it
    assert not finish_interrupted_save(tmp_path)
    with pytest.raises(CheckpointError, match="stale"):
        load_checkpoint(tmp_path)


def test_stale_state_file_is_named(tmp_path):
    run, _ = good_checkpoint(tmp_path)
    old_state = (tmp_path / "last.state.safetensors").read_bytes()
    save(run, tmp_path, step=2)
    (tmp_path / "last.state.safetensors").write_bytes(old_state)  # copied back separately
    with pytest.raises(CheckpointError, match=r"last\.state\.safetensors is stale"):
        load_checkpoint(tmp_path)


def test_next_save_cleans_up_after_a_crash(tmp_path):
    run, _ = good_checkpoint(tmp_path)
    (tmp_path / "last.safetensors.tmp-deadbeef").write_bytes(b"partial")
    (tmp_path / "last.state.safetensors.tmp-deadbeef").write_bytes(b"partial")
    (tmp_path / "best.safetensors.tmp-deadbeef").write_bytes(b"another checkpoint's")
    save(run, tmp_path, step=2)
    assert sorted(os.listdir(tmp_path)) == ["best.safetensors.tmp-deadbeef", "last.safetensors",
                                            "last.state.safetensors"]
    assert load_checkpoint(tmp_path).step == 2


# --- damaged and missing files ---------------------------------------------------------------------

@pytest.mark.parametrize("which", ["last.state.safetensors", "last.safetensors"])
@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, -1], ids=["empty", "7-bytes", "header", "half", "minus-1"])
def test_truncated_file_is_refused(tmp_path, which, keep):
    good_checkpoint(tmp_path)
    path = tmp_path / which
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=rf"/{re.escape(which)} is (truncated or corrupt|corrupt)"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("which", ["last.state.safetensors", "last.safetensors"])
def test_corrupted_data_is_refused(tmp_path, which):
    good_checkpoint(tmp_path)
    path = tmp_path / which
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # a flipped bit in the last tensor: the header still reads
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"/{re.escape(which)} is corrupt: its tensors do not match the digest"):
        load_checkpoint(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint 'last'"):
        load_checkpoint(tmp_path)
    good_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint 'best'"):
        load_checkpoint(tmp_path, "best")
    (tmp_path / "last.state.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: last\.state\.safetensors is missing"):
        load_checkpoint(tmp_path)


def rewrite_metadata(path: Path, **changes: str) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    save_file(tensors, str(path), metadata={**metadata, **changes})


def test_unknown_format_version_is_refused(tmp_path):
    good_checkpoint(tmp_path)
    rewrite_metadata(tmp_path / "last.state.safetensors", format_version="2")
    with pytest.raises(CheckpointError, match=r"format version \'2\'.*reads version 1.*newer xception"):
        load_checkpoint(tmp_path)


def test_weights_overwritten_by_save_weights_is_refused(tmp_path):
    run, _ = good_checkpoint(tmp_path)
    xception.save_weights(run.model, tmp_path / "last.safetensors")
    with pytest.raises(CheckpointError, match="has no checkpoint id"):
        load_checkpoint(tmp_path)


def test_loading_runs_no_pickle(tmp_path, monkeypatch):
    good_checkpoint(tmp_path)
    for path in tmp_path.iterdir():  # pure safetensors: an 8-byte header length, a JSON header, raw data
        data = path.read_bytes()
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        assert 8 + size + max(ends, default=0) == len(data)
        assert all(isinstance(value, str) for value in header["__metadata__"].values())

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling during load_checkpoint")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    state = load_checkpoint(tmp_path)
    assert state.step == 1 and state.optimizer["state"]


# --- what cannot be saved --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "../last", "sub/last", ".hidden", "last.state", "last.safetensors"])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="plain file name"):
        save(make_run("sgd"), tmp_path, name, step=0)


def test_unstorable_value_is_refused_before_writing(tmp_path):
    run, weights = good_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"cannot store extra/callbacks/0: a function"):
        save(run, tmp_path, step=2, extra={"callbacks": [lambda: 0]})
    assert_good_checkpoint_intact(tmp_path, weights)
