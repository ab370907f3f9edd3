"""The deploy candidates (torch, ONNX Runtime, OpenVINO at fp32/bf16/int8), the choice among them, the deploy folder
and ``xception deploy`` / ``predict --deployed``, on a small classifier trained on real Fashion-MNIST images. No
timing is asserted: which candidate wins is the machine's business; that the winner is the fastest that agrees, and
that every candidate is in the record with its reason, is ours."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from xception.benchmark import results_from_json
from xception.benchmark.selection import choose_deployment
from xception.cli import main
from xception.data import load_fashion_mnist
from xception.deploy import (
    CANDIDATES,
    DEPLOY_FILE,
    OpenVinoModel,
    TopOneAgreement,
    get_candidate,
    load_deployed,
    read_record,
    write_deployment,
)
from xception.deploy import runtimes as runtimes_module
from xception.errors import InvalidArgumentError, WeightFileError
from xception.hub import save_pretrained
from xception.inference import deploy_inputs, load_model
from xception.training import TrainConfig, train

TINY = {"stem_widths": (8, 16), "entry_widths": (16, 32), "middle_repeats": 0, "exit_widths": (32, 48),
        "tail_widths": (48, 64)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A compact run trained briefly on Fashion-MNIST, and its calibration and held-out images."""
    output = tmp_path_factory.mktemp("run")
    train(TrainConfig(output=output, model_options=TINY, epochs=2, batch_size=32, lr=0.4, train_subset=1024,
                      val_subset=200, progress=False))
    loaded = load_model(output)
    return output, loaded, deploy_inputs(loaded, "fashion-mnist", 64, 200)


@pytest.mark.parametrize("candidate", CANDIDATES, ids=lambda candidate: candidate.name)
def test_every_candidate_builds_agrees_and_round_trips(candidate, trained, tmp_path):
    """Each candidate this machine can build agrees with eager fp32 on real images, and the folder written from it
    loads back (in a fresh object of its runtime) and gives the same outputs. One that cannot be built here (bf16
    without native support, a runtime not installed) is skipped with the reason deploy.json would record."""
    if (reason := candidate.unavailable()) is not None:
        pytest.skip(reason)
    _, loaded, (calibration, held_out, labels) = trained
    model = candidate.build(loaded.model, calibration[:4], list(calibration.split(16)))
    assert (model.runtime, model.precision) == (candidate.runtime, candidate.precision)
    with torch.no_grad():
        reference, output = loaded.model(held_out), model(held_out[:4])
    measured = TopOneAgreement().measure(reference[:4], output, labels[:4])
    assert output.dtype == torch.float32 and output.shape == (4, 10)
    bound = {"fp32": 1e-4, "bf16": 0.05, "int8": 0.25}[candidate.precision]
    assert ((output - reference[:4]).abs().max() / reference.abs().max()) < bound
    all_outputs = torch.cat([model(batch) for batch in held_out.split(4)])
    agreement = TopOneAgreement().measure(reference, all_outputs, labels)["agreement"]
    assert agreement >= {"fp32": 1.0, "bf16": 0.97, "int8": 0.9}[candidate.precision], measured

    write_deployment(tmp_path, model, {"task": "classification", "classes": loaded.classes})
    again = load_deployed(tmp_path).model
    assert type(again) is type(model)
    torch.testing.assert_close(again(held_out[:4]), output, rtol=1e-5, atol=1e-5)


def test_the_choice_is_the_fastest_that_agrees_and_the_record_keeps_every_candidate(trained, monkeypatch):
    """OpenVINO made to disagree (its logits negated) is rejected with the measured agreement, a missing runtime is
    skipped with its reason, a runtime that fails is recorded as failed; the winner is the fastest accepted one."""
    _, loaded, (calibration, held_out, labels) = trained
    real_forward = OpenVinoModel.forward
    monkeypatch.setattr(OpenVinoModel, "forward", lambda self, x: -real_forward(self, x))
    real_find_spec = runtimes_module.importlib.util.find_spec
    monkeypatch.setattr(runtimes_module.importlib.util, "find_spec",
                        lambda name: None if name == "torchao" else real_find_spec(name))
    broken = get_candidate("onnxruntime int8")

    def fail(*args, **kwargs):
        raise RuntimeError("the quantizer gave up")

    monkeypatch.setattr(runtimes_module, "CANDIDATES", tuple(
        type(broken)(c.runtime, c.precision, c.packages, fail) if c is broken else c for c in CANDIDATES))
    selection = choose_deployment(loaded.model, calibration, held_out, labels, batch_size=4, repeats=1, iterations=2,
                                  candidates=["onnxruntime fp32", "onnxruntime int8", "openvino fp32", "torch int8"])
    rows = {row["candidate"]: row for row in selection.rows}
    assert rows["onnxruntime fp32"]["status"] == "chosen" and rows["onnxruntime fp32"]["agreement"] == 1.0
    assert selection.winner is not None and selection.winner.candidate == "onnxruntime fp32"
    assert rows["openvino fp32"]["status"] == "rejected" and rows["openvino fp32"]["agreement"] < 0.5
    assert "top-1 agreement with fp32" in rows["openvino fp32"]["reason"]
    assert rows["openvino fp32"]["images_per_s"] > 0  # a rejected candidate is still timed, for the record
    assert rows["torch int8"] == {"candidate": "torch int8", "runtime": "torch", "precision": "int8",
                                  "status": "skipped", "reason": "torchao not installed (pip install "
                                  "'xception[deploy]')"}
    assert rows["onnxruntime int8"]["status"] == "failed"
    assert rows["onnxruntime int8"]["reason"] == "RuntimeError: the quantizer gave up"
    assert selection.record["machine"] and selection.record["held_out_images"] == len(held_out)

    nothing = choose_deployment(loaded.model, calibration, held_out, labels, batch_size=2, repeats=1, iterations=1,
                                candidates=["onnxruntime fp32"], agreement=TopOneAgreement(1.01))
    assert nothing.winner is None and nothing.rows[0]["status"] == "rejected"


def test_the_deploy_folder_is_replaced_whole_and_refused_when_foreign(trained, tmp_path, monkeypatch, capsys):
    """A new deployment replaces the old one's files; a foreign folder is refused untouched; a folder whose runtime
    is not installed, or that lacks a file, or is of another format version, is refused saying what to do."""
    _, loaded, (calibration, _, _) = trained
    first = get_candidate("onnxruntime fp32").build(loaded.model, calibration[:2], [calibration])
    second = get_candidate("openvino fp32").build(loaded.model, calibration[:2], [calibration])
    described = {"task": "classification", "classes": loaded.classes, "preprocessing": loaded.preprocessing}
    write_deployment(tmp_path / "out", first, described)
    write_deployment(tmp_path / "out", second, described)
    record = read_record(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([DEPLOY_FILE, *record["artifact"]["files"]])
    assert record["artifact"]["runtime"] == "openvino"

    image = tmp_path / "0.png"
    Image.fromarray(load_fashion_mnist("test")[0][0].numpy()).save(image)
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
        assert main(["predict", "--deployed", str(tmp_path / "out"), str(image)]) == 2
    assert "needs openvino, which is not installed (pip install 'xception[deploy]')" in capsys.readouterr().err

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidArgumentError, match=r"holds files but no deploy\.json"):
        write_deployment(tmp_path / "mine", first, {"task": "classification", "classes": loaded.classes})
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]

    with pytest.raises(InvalidArgumentError, match=r"holds no deploy\.json"):
        load_deployed(tmp_path / "mine")
    (tmp_path / "out" / record["artifact"]["files"][1]).unlink()
    with pytest.raises(WeightFileError, match=r"lacks model-.*\.bin, which its deploy\.json names"):
        load_deployed(tmp_path / "out")
    (tmp_path / "out" / DEPLOY_FILE).write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(WeightFileError, match="format version 99"):
        load_deployed(tmp_path / "out")


def test_deploy_command_and_predict_with_the_deployed_folder(trained, tmp_path, capsys):
    """The chosen model predicts the same classes as the run it came from, through the same preprocessing."""
    run, _, _ = trained
    output = tmp_path / "deployed"
    assert main(["deploy", "--checkpoint", str(run), "--candidates", "onnxruntime fp32,openvino fp32",
                 "--calibration-images", "32", "--held-out-images", "50", "--batch-size", "4", "--repeats", "1",
                 "--output", str(output), "--json"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    record = read_record(output)
    assert summary["chosen"] == f"{record['artifact']['runtime']} {record['artifact']['precision']}"
    assert {row["candidate"] for row in record["candidates"]} == {"onnxruntime fp32", "openvino fp32"}
    assert record["classes"][0] == "T-shirt/top" and record["preprocessing"]["crop_size"] == 28
    assert record["machine"] in printed and record["batch_size"] == 4 and record["held_out_images"] == 50

    images, _ = load_fashion_mnist("test")
    for i in range(4):
        Image.fromarray(images[i].numpy()).save(tmp_path / f"{i}.png")
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(tmp_path / "colour.jpg")  # any size and mode
    inputs = [str(tmp_path / name) for name in ("0.png", "1.png", "2.png", "3.png", "colour.jpg")]
    assert main(["predict", "--checkpoint", str(run), "--precision", "fp32", "--json", *inputs]) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert main(["predict", "--deployed", str(output), "--json", *inputs]) == 0
    deployed = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    for before, after in zip(expected, deployed, strict=True):
        assert [p["class"] for p in after["predictions"]] == [p["class"] for p in before["predictions"]]
        assert after["predictions"][0]["probability"] == pytest.approx(before["predictions"][0]["probability"],
                                                                       abs=1e-4)

    assert main(["predict", "--deployed", str(output), "--checkpoint", str(run), inputs[0]]) == 2
    assert "leave out --checkpoint" in capsys.readouterr().err

    # A save_pretrained folder records no data folder to calibrate on (a run's config.json does): asked for.
    save_pretrained(run, tmp_path / "shared")
    assert main(["deploy", "--checkpoint", str(tmp_path / "shared"), "--output", str(tmp_path / "x")]) == 2
    assert "give --calibration DATA" in capsys.readouterr().err


def test_benchmark_of_a_trained_run_reports_each_runtime_s_agreement_on_real_images(trained, monkeypatch, capsys):
    """``benchmark --compare --checkpoint``: the run's model, its deployed forms and its other runtimes timed on real
    images at the run's size, each with its top-1 agreement with the eager fp32 model on held-out images. OpenVINO's
    outputs are negated here (so its top-1 is fp32's bottom-1): its rows must disagree, which they can only if each
    row's agreement is measured on that candidate's own outputs."""
    run, _, _ = trained
    forward = OpenVinoModel.forward
    monkeypatch.setattr(OpenVinoModel, "forward", lambda self, x: -forward(self, x))
    common = ["benchmark", "--checkpoint", str(run), "--compare", "--batch-size", "4", "--calibration-images", "32",
              "--held-out-images", "50", "--warmup", "0", "--repeats", "1", "--iterations", "1"]
    assert main([*common, "--deploy", "fp32", "--peers", "onnxruntime,openvino", "--format", "json"]) == 0
    printed = capsys.readouterr().out
    results = {result.candidate: result for result in results_from_json(printed[printed.index("\n[") + 1:])}
    assert "50 held-out images" in printed
    assert set(results) == {"xception", "xception deploy", "onnxruntime fp32", "onnxruntime int8", "openvino fp32",
                            "openvino int8"}
    assert all(r.img_size == (28, 28) and r.batch_size == 4 and r.images_per_s for r in results.values())
    assert results["xception"].agreement == 1.0  # the reference itself
    assert results["xception deploy"].agreement >= 0.98 and results["onnxruntime fp32"].agreement >= 0.98
    assert 0.9 <= results["onnxruntime int8"].agreement <= 1.0
    assert results["openvino fp32"].agreement < 0.5 and results["openvino int8"].agreement < 0.5

    # The other implementations of the paper's network do not carry the run's weights.
    assert main([*common, "--peers", "timm"]) == 2
    assert "cannot run a trained model's weights" in capsys.readouterr().err
