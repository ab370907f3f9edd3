"""Training that survives its process: resume after SIGKILL bit for bit, two DDP processes against one, a
non-finite loss, a corrupt image and a class mismatch on resume, the step log across a resume. Each test starts
processes of its own (kept apart from test_loop.py's trained run, so that the two files share the test workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from loop_samples import QUICK, TINY, TINY_ARGS, xception_train
from PIL import Image
from safetensors.torch import load_file

from xception.data import load_fashion_mnist
from xception.training import TrainConfig, TrainingError, train


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    common = ["--epochs", "2", "--deterministic", "--checkpoint-every", "3"]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    subprocess.run(xception_train(*common, "--output", str(reference)), check=True, capture_output=True)

    process = subprocess.Popen(xception_train(*common, "--output", str(interrupted)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    state = interrupted / "last.state.safetensors"
    deadline = time.monotonic() + 300
    while not state.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere past the first checkpoint, mid-epoch
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    subprocess.run(xception_train(*common, "--output", str(interrupted), "--resume"), check=True, capture_output=True)
    expected, actual = weights_of(reference / "last.safetensors"), weights_of(interrupted / "last.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, accumulation: int, free_port: str):
    """torchrun with 2 CPU processes of batch 16 against 1 process of 2 x 16 by gradient accumulation: the same
    samples per micro-batch (so the same BatchNorm statistics), the same averaged gradients. With accumulation in
    the processes too, their micro-steps skip the all-reduce (no_sync) and the last one averages everything."""
    # fp32: bf16 rounding would swamp the 1e-5 comparison (the compact recipe trains in bf16 by default).
    # With accumulation in the processes the gradients are summed in another order ((g0 + g2) + (g1 + g3) against
    # g0 + g1 + g2 + g3): 1e-8 apart after one step, which four steps at this learning rate amplify past 1e-5.
    steps = "4" if accumulation == 1 else "1"
    common = ["--epochs", "1", "--max-steps", steps, "--batch-size", "16", "--drop-rate", "0", "--ema-decay", "0",
              "--deterministic", "--precision", "fp32"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    # One thread each: a kernel's summation order depends on the thread count, and early-layer gradients are
    # sums that cancel, so two threads against one already differ by about 1e-5 after a step.
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(xception_train(*common, "--grad-accumulation", str(2 * accumulation), "--output", str(single)),
                   check=True, capture_output=True, env=one_thread)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port,
                    "-m", "xception", "train", *TINY_ARGS, *QUICK, *common, "--grad-accumulation", str(accumulation),
                    "--output", str(ddp)],
                   check=True, capture_output=True, env=one_thread)
    expected, actual = weights_of(single / "last.safetensors"), weights_of(ddp / "last.safetensors")
    trained = [name for name in expected if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert trained
    for name in trained:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    changed = weights_of(single / "last.safetensors")["head.predictions.weight"]
    assert changed.abs().sum() > 0


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    config = TrainConfig(output=tmp_path, model_options=TINY, epochs=1, batch_size=32, train_subset=512,
                         val_subset=100, lr=1e12, checkpoint_every=1, progress=False, ema_decay=0)
    with pytest.raises(TrainingError, match=r"non-finite (loss|weights) .*step \d+"):
        train(config)
    good = load_file(str(tmp_path / "last.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values() if t.dtype.is_floating_point)


def test_folder_data_with_a_corrupt_image_and_class_mismatch_on_resume(tmp_path):
    images, labels = load_fashion_mnist("test")
    root = tmp_path / "data"
    for split, start in (("train", 0), ("val", 200)):
        for i in range(start, start + 96):
            folder = root / split / f"class{int(labels[i]) % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i].numpy()).save(folder / f"{i}.png")
    (root / "train" / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    output = tmp_path / "run"
    config = TrainConfig(data=str(root), output=output, model_options=TINY, epochs=1, batch_size=16, img_size=28,
                         progress=False)
    result = train(config)
    assert result["history"][0]["skipped_images"] == 1
    # Resuming the same run on data with another class count is refused before training.
    (root / "train" / "class3").mkdir()
    Image.fromarray(images[0].numpy()).save(root / "train" / "class3" / "x.png")
    (root / "val" / "class3").mkdir()
    Image.fromarray(images[1].numpy()).save(root / "val" / "class3" / "x.png")
    with pytest.raises(TrainingError, match="3 classes but the data has 4"):
        train(TrainConfig(data=str(root), output=output, model_options=TINY, epochs=2, batch_size=16, img_size=28,
                          resume=True, progress=False))


def test_step_log_covers_the_whole_run_after_a_resume(tmp_path):
    """train() returns the step log from the first step even when it resumed; the experiments rely on it."""
    common = {"model_options": TINY, "batch_size": 32, "lr": 0.4, "train_subset": 2048, "val_subset": 100,
              "epochs": 1, "progress": False, "output": tmp_path}
    stopped = train(TrainConfig(max_steps=20, **common))
    assert stopped["stopped"] == "max_steps=20" and [r["step"] for r in stopped["steps_log"]] == [20]
    resumed = train(TrainConfig(resume=True, **common))
    assert resumed["stopped"] == "finished"
    assert resumed["steps"] == 64
    assert [r["step"] for r in resumed["steps_log"]] == [20, 40, 60]
    again = train(TrainConfig(resume=True, **common))  # a finished run has nothing left to do
    assert (again["stopped"], again["steps"], len(again["history"])) == ("finished", 64, 1)
