"""The layer summary: parameters, shapes and MACs checked against counts made independently of it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import xception
from xception.layers import SeparableConv2d
from xception.summary import ModelSummary, summarize


def ceil_half(side: int) -> int:
    return -(-side // 2)


def paper_macs(height: int, width: int, classes: int = 1000) -> int:
    """MACs of the paper's Xception (Figure 5), written from the architecture rather than the code."""

    def sep(pixels: int, cin: int, cout: int) -> int:  # 3x3 depthwise, then 1x1 pointwise
        return pixels * cin * 9 + pixels * cin * cout

    h, w = (height - 3) // 2 + 1, (width - 3) // 2 + 1  # conv 32 3x3/2 valid
    total = h * w * 32 * 3 * 9
    h, w = h - 2, w - 2  # conv 64 3x3 valid
    total += h * w * 64 * 32 * 9
    cin = 64
    for cout in (128, 256, 728):  # entry flow: two sepconvs, max-pool /2, 1x1 stride-2 shortcut
        total += sep(h * w, cin, cout) + sep(h * w, cout, cout)
        h, w = ceil_half(h), ceil_half(w)
        total += h * w * cin * cout
        cin = cout
    total += 8 * 3 * sep(h * w, 728, 728)  # middle flow
    total += sep(h * w, 728, 728) + sep(h * w, 728, 1024)  # exit flow
    h, w = ceil_half(h), ceil_half(w)
    total += h * w * 728 * 1024
    total += sep(h * w, 1024, 1536) + sep(h * w, 1536, 2048)
    return total + 2048 * classes


def module_macs(model: nn.Module, size: tuple[int, int]) -> int:
    """A second count: every Conv2d and Linear anywhere in the model, from its own recorded output."""
    outputs: dict[nn.Module, torch.Size] = {}
    handles = [m.register_forward_hook(lambda m, a, out: outputs.__setitem__(m, out.shape))
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, model.in_chans, *size))
    finally:
        for handle in handles:
            handle.remove()
    total = 0
    for module, shape in outputs.items():
        if isinstance(module, nn.Conv2d):
            total += shape[1] * shape[2] * shape[3] * module.weight[0].numel()  # weight[0]: C_in/groups x kh x kw
        else:
            total += shape[1] * module.weight.shape[1]
    return total


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return xception.create_model("xception")


@pytest.fixture(scope="module")
def summary(model: nn.Module) -> ModelSummary:
    return summarize(model)


def rows_by_name(summary: ModelSummary) -> dict:
    return {row.name: row for row in summary.rows}


def test_parameters(model: nn.Module, summary: ModelSummary) -> None:
    assert summary.total_params == 22_855_952 == sum(p.numel() for p in model.parameters())
    assert summary.trainable_params == summary.total_params
    assert sum(row.params for row in summary.rows) == summary.total_params
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert summary.buffers == 2 * sum(bn.num_features for bn in bns) == 54_528
    # Keras's total counts the BN statistics as parameters: every state-dict entry but num_batches_tracked.
    keras_total = sum(v.numel() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert summary.total_params + summary.buffers == keras_total


def test_separable_convolutions_are_one_row(model: nn.Module, summary: ModelSummary) -> None:
    rows = rows_by_name(summary)
    assert not [name for name in rows if name.endswith((".depthwise", ".pointwise", ".mid", ".mid_norm"))]
    separables = {name for name, m in model.named_modules() if isinstance(m, SeparableConv2d)}
    assert separables == {row.name for row in summary.rows if row.kind == "SeparableConv2d"}
    row = rows["blocks.block5.layers.sepconv1"]
    assert row.output_shape == (728, 19, 19)
    assert row.params == SeparableConv2d.count_parameters(728, 728) == 728 * 9 + 728 * 728
    assert row.macs == 19 * 19 * 728 * 9 + 19 * 19 * 728 * 728


def test_output_shapes(summary: ModelSummary) -> None:
    rows = rows_by_name(summary)
    expected = {
        "blocks.block1.conv1": (32, 149, 149),
        "blocks.block1.conv2": (64, 147, 147),
        "blocks.block2.layers.pool": (128, 74, 74),
        "blocks.block2.shortcut.conv": (128, 74, 74),
        "blocks.block4.layers.pool": (728, 19, 19),
        "blocks.block13.layers.pool": (1024, 10, 10),
        "blocks.block14.layers.sepconv2_act": (2048, 10, 10),
        "head.global_pool": (2048,),
        "head.predictions": (1000,),
    }
    assert {name: rows[name].output_shape for name in expected} == expected
    assert rows["blocks.block2.layers.pool"].kind == "MaxPool2dSame"
    names = [row.name for row in summary.rows]
    assert names.index("head.global_pool") == names.index("head.predictions") - 2  # then dropout
    assert rows["head.predictions"].macs == 2048 * 1000


@pytest.mark.parametrize("size", [299, 71, (240, 320)])
def test_total_macs(model: nn.Module, size: int | tuple[int, int]) -> None:
    height, width = (size, size) if isinstance(size, int) else size
    result = summarize(model, size)
    assert result.input_size == (3, height, width)
    assert result.total_macs == sum(row.macs for row in result.rows)
    assert result.total_macs == paper_macs(height, width) == module_macs(model, (height, width))


def test_total_macs_at_299_is_the_published_8_4_gigamacs(summary: ModelSummary) -> None:
    assert 8.35e9 < summary.total_macs < 8.38e9
    assert f"MACs per image: {summary.total_macs / 1e9:.2f} G ({summary.total_macs:,})" in summary.to_table()


def test_small_and_non_square_inputs(model: nn.Module) -> None:
    assert rows_by_name(summarize(model, 71))["blocks.block14.layers.sepconv2_act"].output_shape == (2048, 3, 3)
    rows = rows_by_name(summarize(model, (240, 320)))
    # height 240 -> 119 -> 117 -> 59 -> 30 -> 15 -> 8; width 320 -> 159 -> 157 -> 79 -> 40 -> 20 -> 10
    assert rows["blocks.block1.conv2"].output_shape == (64, 117, 157)
    assert rows["blocks.block14.layers.sepconv2"].output_shape == (2048, 8, 10)


def test_table(summary: ModelSummary) -> None:
    table = summary.to_table()
    lines = table.splitlines()
    assert lines[0].split() == ["Layer", "Type", "Output", "shape", "Params", "MACs"]
    for line in ("Total params: 22,855,952", "Trainable params: 22,855,952",
                 "Non-trainable (BN statistics): 54,528", "Input: 3x299x299"):
        assert line in lines
    assert any(line.startswith("blocks.block5.layers.sepconv1 ") and "536,536" in line for line in lines)
    assert len({len(line) for line in lines[: len(summary.rows) + 2]}) == 1  # aligned columns


def test_to_dict_is_json(summary: ModelSummary) -> None:
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["total_params"] == summary.total_params and data["total_macs"] == summary.total_macs
    assert data["input_size"] == [3, 299, 299]
    assert data["rows"][0] == {"name": "blocks.block1.conv1", "kind": "Conv2d", "output_shape": [32, 149, 149],
                               "params": 864, "macs": 149 * 149 * 32 * 3 * 9}


def assert_clean(model: nn.Module) -> None:
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_hooks_removed_and_training_flags_restored(model: nn.Module) -> None:
    model.train()
    model.blocks.block1.eval()
    try:
        flags = [m.training for m in model.modules()]
        summarize(model, 71)
        assert [m.training for m in model.modules()] == flags
        assert_clean(model)
        with pytest.raises(ValueError, match="too small"):
            summarize(model, 40)
        assert [m.training for m in model.modules()] == flags
        assert_clean(model)
    finally:
        model.eval()


def test_variants() -> None:
    model = xception.create_model("xception", in_chans=1, num_classes=10, fc_layers=(256,), mid_activation="bn",
                                  global_pool="max")
    result = summarize(model, 71)
    rows = rows_by_name(result)
    assert result.input_size == (1, 71, 71)
    assert rows["head.global_pool"].kind == "GlobalMaxPool2d"
    assert rows["head.fc_layers.fc1"].macs == 2048 * 256 and rows["head.predictions"].macs == 256 * 10
    # The mid BatchNorm's weight and bias belong to the separable convolution's row.
    assert rows["blocks.block14.layers.sepconv1"].params == SeparableConv2d.count_parameters(1024, 1536) + 2 * 1024
    assert sum(row.params for row in result.rows) == result.total_params
    assert result.total_macs == module_macs(model, (71, 71))

    features = xception.create_model("xception", num_classes=0, global_pool="")
    rows = rows_by_name(summarize(features, 71))
    assert "head.global_pool" not in rows and rows["head.predictions"].kind == "Identity"
    assert rows["head.predictions"].output_shape == (2048, 3, 3)
