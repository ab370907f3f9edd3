"""The ``xception`` command line, called in-process, plus one run of the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from keras_reference import random_keras_h5
from torch import nn

import xception
from xception import cli
from xception.cli import main
from xception.weights.formats import read_safetensors_metadata

SMALL = (96, 96)


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keras")
    return {"top": random_keras_h5(folder / "top.h5", include_top=True, seed=7),
            "notop": random_keras_h5(folder / "notop.h5", include_top=False, seed=8)}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_same_weights(actual: nn.Module, expected: nn.Module) -> None:
    a, e = actual.state_dict(), expected.state_dict()
    assert list(a) == list(e)
    for name in e:
        assert torch.equal(a[name], e[name]), name


def outputs(model: nn.Module) -> torch.Tensor:
    x = torch.rand(2, 3, *SMALL, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        return model.eval()(x)


# --- summary and models ---------------------------------------------------------------------------

def test_summary_table(capsys) -> None:
    code, out, err = run(capsys, "summary", "xception")
    assert code == 0 and err == ""
    assert "Total params: 22,855,952" in out
    assert "Non-trainable (BN statistics): 54,528" in out
    row = next(line for line in out.splitlines() if line.startswith("blocks.block2.layers.sepconv1 "))
    assert row.split()[1:3] == ["SeparableConv2d", "128x147x147"]
    assert "Input: 3x299x299" in out


def test_summary_json(capsys) -> None:
    code, out, _ = run(capsys, "summary", "xception", "--json", "--img-size", "96", "--width", "128")
    assert code == 0
    summary = json.loads(out)
    assert summary["total_params"] == 22_855_952
    assert summary["buffers"] == 54_528
    assert summary["input_size"] == [3, 96, 128]
    assert any(row["name"] == "blocks.block2.layers.sepconv1" for row in summary["rows"])


def test_summary_set_options(capsys) -> None:
    code, out, _ = run(capsys, "summary", "xception", "--json", "--img-size", "96", "--set", "middle_repeats=0")
    assert code == 0
    summary = json.loads(out)
    # each middle-flow module: three separable convs 728 -> 728 and their BNs
    middle_module = 3 * (728 * 9 + 728 * 728 + 2 * 728)
    assert summary["total_params"] == 22_855_952 - 8 * middle_module
    assert not any(row["name"].startswith("blocks.block5.layers.sepconv3") for row in summary["rows"])


def test_summary_unknown_option(capsys) -> None:
    code, out, err = run(capsys, "summary", "xception", "--set", "middle_repeat=4")
    assert code == 2
    assert out == ""
    assert "xception summary: error:" in err and "middle_repeat" in err
    assert "valid options" in err and "middle_repeats" in err and "mid_activation" in err


def test_every_command_prints_its_help(capsys) -> None:
    """argparse formats help strings with %: a stray one breaks --help only when it is asked for."""
    from xception.cli import build_parser

    commands = next(action.choices for action in build_parser()._actions if action.choices)
    assert "benchmark" in commands
    for command in [None, *commands]:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"] if command else ["--help"])
        assert exit_info.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_models(capsys) -> None:
    code, out, _ = run(capsys, "models")
    assert code == 0
    line = next(line for line in out.splitlines() if line.split()[0] == "xception")
    assert "imagenet" in line


def test_console_script() -> None:
    script = Path(sys.executable).with_name("xception")
    executable = str(script) if script.exists() else shutil.which("xception")
    assert executable, "the xception console script is not installed"
    result = subprocess.run([executable, "models"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "xception" in result.stdout and "imagenet" in result.stdout


# --- convert -----------------------------------------------------------------------------------------

def test_convert_keras_file(keras_files, tmp_path: Path, capsys) -> None:
    dst = tmp_path / "converted.safetensors"
    code, out, err = run(capsys, "convert", str(keras_files["top"]), str(dst))
    assert code == 0, err
    assert "Keras 1 HDF5" in out and "num_classes=1000" in out and "numerics=keras" in out  # the official layout
    meta = read_safetensors_metadata(dst)
    assert json.loads(meta["architecture"])["num_classes"] == 1000
    converted = xception.create_model("xception", weights=dst)
    direct = xception.create_model("xception", weights=keras_files["top"])
    assert_same_weights(converted, direct)
    assert torch.equal(outputs(converted), outputs(direct))


def test_convert_notop_keras_file(keras_files, tmp_path: Path, capsys) -> None:
    dst = tmp_path / "notop.safetensors"
    code, out, err = run(capsys, "convert", str(keras_files["notop"]), str(dst))
    assert code == 0, err
    assert "num_classes=0" in out
    architecture = json.loads(read_safetensors_metadata(dst)["architecture"])
    assert architecture["num_classes"] == 0
    converted = xception.create_model("xception", num_classes=0, weights=dst)
    assert_same_weights(converted, xception.create_model("xception", num_classes=0, weights=keras_files["notop"]))
    with pytest.raises(xception.WeightFileError, match="num_classes=0"):
        xception.create_model("xception", weights=dst)


def test_convert_timm_checkpoint(tmp_path: Path, capsys) -> None:
    src = tmp_path / "legacy_xception.pth"
    torch.save(timm.create_model("legacy_xception", pretrained=False, num_classes=10).state_dict(), src)
    dst = tmp_path / "timm.safetensors"
    code, out, err = run(capsys, "convert", str(src), str(dst))
    assert code == 0, err
    assert "timm legacy_xception" in out and "num_classes=10" in out and "numerics=timm" in out
    architecture = json.loads(read_safetensors_metadata(dst)["architecture"])
    assert architecture["numerics"] == "timm" and architecture["num_classes"] == 10
    converted = xception.create_model("xception", num_classes=10, numerics="timm", weights=dst)
    assert_same_weights(converted, xception.create_model("xception", num_classes=10, numerics="timm", weights=src))


@pytest.mark.parametrize("source", ["missing", "text", "resnet"])
def test_convert_bad_source(source: str, tmp_path: Path, capsys) -> None:
    src = tmp_path / "source.pth"
    if source == "text":
        src.write_text("not weights\n")
    elif source == "resnet":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(1000)}, src)
    dst = tmp_path / "out.safetensors"
    code, out, err = run(capsys, "convert", str(src), str(dst))
    assert code == 2
    assert out == ""
    assert err.startswith("xception convert: error:") and str(src) in err
    assert {"missing": "does not exist", "text": "not a weight file", "resnet": "not an Xception"}[source] in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if source == "missing" else ["source.pth"])


def test_convert_into_missing_folder(keras_files, tmp_path: Path, capsys) -> None:
    dst = tmp_path / "no" / "such" / "folder" / "out.safetensors"
    code, out, err = run(capsys, "convert", str(keras_files["notop"]), str(dst))
    assert code == 2 and out == ""
    assert "xception convert: error:" in err and "out.safetensors" in err and "does not exist" in err
    assert not (tmp_path / "no").exists()


def test_convert_keeps_the_architecture_of_a_saved_file(tmp_path: Path, capsys) -> None:
    saved = xception.create_model("xception", num_classes=5, numerics="timm", middle_repeats=2)
    src = xception.save_weights(saved, tmp_path / "saved.safetensors")
    dst = tmp_path / "out.safetensors"
    code, out, err = run(capsys, "convert", str(src), str(dst))
    assert code == 0, err
    assert "num_classes=5" in out and "numerics=timm" in out
    assert json.loads(read_safetensors_metadata(dst)["architecture"]) == json.loads(
        read_safetensors_metadata(src)["architecture"])
    assert_same_weights(xception.create_model("xception", num_classes=5, numerics="timm", middle_repeats=2,
                                              weights=dst), saved)


def test_benchmark_json(capsys):
    import json as json_module

    code = main(["benchmark", "--set", "middle_repeats=0", "--img-size", "71", "--warmup", "1", "--repeats", "1",
                 "--iterations", "1", "--format", "json"])
    assert code == 0
    results = json_module.loads(capsys.readouterr().out)
    assert len(results) == 1 and results[0]["candidate"] == "xception" and results[0]["images_per_s"] > 0


def test_benchmark_compare_refuses_a_different_architecture(capsys):
    assert main(["benchmark", "--compare", "--set", "middle_repeats=0"]) == 2
    assert "--compare" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--epochs", "-1"], "argument --epochs: must be >= 1, got -1"),
    (["train", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["train", "--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["train", "--label-smoothing", "1"], "argument --label-smoothing: must be < 1, got 1.0"),
    (["predict", "--weights", "imagenet", "--top-k", "0", "cat.jpg"], "argument --top-k: must be >= 1, got 0"),
    (["eval", "--weights", "imagenet", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
])
def test_options_are_validated_where_they_are_parsed(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_train_config_refuses_what_the_flags_refuse() -> None:
    from xception.training import TrainConfig

    with pytest.raises(xception.XceptionError, match=r"epochs \(--epochs\) must be >= 1, got -1"):
        TrainConfig(epochs=-1)
    with pytest.raises(ValueError, match=r"lr \(--lr\) must be a finite number"):
        TrainConfig(lr=float("inf"))


def test_library_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys) -> None:
    assert main(["summary", "xception", "--set", "middle_repeat=1"]) == 2
    assert capsys.readouterr().err.startswith("xception summary: error: unknown Xception option(s) ['middle_repeat']")

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "command_models", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["models"])


def test_every_train_flag_reaches_train_config() -> None:
    """The flags are generated from TrainConfig: each parses into its field, whatever the flag's spelling."""
    from xception.training.config import config_from_args

    argv = ["train", "--data", "folder", "--recipe", "finetune", "--model", "xception41", "--set", "middle_repeats=4",
            "--epochs", "3", "--batch-size", "8", "--lr", "0.01", "--optimizer", "sgd", "--weight-decay", "0.002",
            "--img-size", "64", "--weights", "tf_in1k",
            "--head-steps", "10", "--min-steps", "50", "--freeze-lr-scale", "20", "--layer-decay", "0.8",
            "--no-freeze-bn",
            "--augment", "randaugment", "--mixup", "0.2", "--cutmix", "1.0", "--random-erasing", "0.25",
            "--class-weights", "balanced",
            "--freeze", "^blocks\\.block1\\.", "--output", "out", "--resume", "--seed", "3", "--deterministic",
            "--workers", "2", "--precision", "bf16", "--no-channels-last", "--compile", "--max-minutes", "5",
            "--grad-accumulation", "2", "--clip-grad-norm", "1.5", "--drop-rate", "0.1", "--label-smoothing", "0.1",
            "--ema-decay", "0.99", "--sync-bn", "--checkpoint-every", "7", "--max-steps", "9", "--classes", "a,b",
            "--train-per-class", "4", "--train-subset", "40", "--val-subset", "20"]
    args = cli.build_parser().parse_args(argv)
    config = config_from_args(args, cli.parse_options(args.model_options))
    assert config.model_options == {"middle_repeats": 4}
    assert (config.augmentation, config.freeze_bn, config.channels_last, config.weights) == (
        "randaugment", False, False, "tf_in1k")
    assert (config.mixup, config.cutmix, config.random_erasing, config.class_weights) == (0.2, 1.0, 0.25, "balanced")
    assert (config.classes, config.train_per_class, config.freeze) == ("a,b", 4, "^blocks\\.block1\\.")
    assert (config.head_steps, config.min_steps, config.freeze_lr_scale, config.layer_decay) == (10, 50, 20.0, 0.8)
    assert (config.optimizer, config.weight_decay) == ("sgd", 0.002)
    recipe = config.resolved_recipe()
    assert (recipe.name, recipe.optimizer, recipe.weight_decay) == ("finetune", "sgd", 0.002)  # finetune's is adamw
    defaults = config_from_args(cli.build_parser().parse_args(["train"]), {})
    assert defaults == xception.training.TrainConfig()


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--set", "middle_repeats=abc"],
     "xception train: error: middle_repeats (--set) must be an integer >= 0, got 'abc'\n"),
    (["segment", "train", "--data", "nowhere", "--output", "nowhere", "--set", "atrous_rates=6"],
     "xception segment: error: atrous_rates (--set) must be one or more rates (positive integers) or None, got 6\n"),
    (["summary", "xception", "--set", "stem_widths=[16]"],
     "xception summary: error: stem_widths (--set) must be two widths (positive integers), got [16]\n"),
    (["benchmark", "--set", "drop_rate=2"], "xception benchmark: error: drop_rate (--set) must be in [0, 1), got 2\n"),
])
def test_a_wrong_set_value_is_one_line_before_anything_runs(argv: list[str], message: str, monkeypatch,
                                                            capsys) -> None:
    """Refused where --set is parsed, naming the flag: training never starts (no data read), no traceback."""
    from xception import training

    def must_not_run(*args, **kwargs):
        raise AssertionError("training started with a wrong --set value")

    monkeypatch.setattr(training, "train", must_not_run)
    code, out, err = run(capsys, *argv)
    assert (code, out, err) == (2, "", message)


def test_a_set_value_the_model_refuses_is_one_line(capsys) -> None:
    """A value some model takes passes --set's check; the model it is given to refuses it in one line."""
    code, out, err = run(capsys, "benchmark", "--model", "deeplabv3plus_xception", "--set", "num_classes=0")
    assert (code, out) == (2, "")
    assert err == "xception benchmark: error: num_classes must be an integer >= 1 for a segmentation model, got 0\n"


@pytest.mark.parametrize(("argv", "message"), [
    (["summary", "xception", "--set", "num_classes=5"], "num_classes is not an architecture option for --set: it "
                                                        "comes from --num-classes"),
    (["train", "--set", "in_chans=1"], "in_chans is not an architecture option for --set: it comes from the data's "
                                       "channels"),
    (["benchmark", "--set", "device=abc"], "device is not an architecture option for --set: it comes from --device"),
])
def test_a_create_model_argument_given_by_set_is_refused_naming_its_flag(argv: list[str], message: str,
                                                                         capsys) -> None:
    """These used to reach create_model twice (a TypeError traceback) or reach torch (a RuntimeError)."""
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "") and err.endswith(f"error: {message}\n")
