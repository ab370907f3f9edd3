"""The backbone API of every model: feature maps, output stride, multi-grid, out_indices, forward_intermediates,
scripting / export / compile, stochastic depth and gradient checkpointing."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import xception
from xception.layers import DropPath, MaxPool2dSame
from xception.models import backbone
from xception.models.backbone import FeatureExtractor, ResidualBlock

ALL_MODELS = ["xception", "xception41", "xception65", "xception71", "xception41p", "xception65p"]
ALIGNED = ["xception41", "xception65", "xception71", "xception41p", "xception65p"]
# As printed by `xception models --markdown`.
CHANNELS = {
    "xception": (64, 128, 256, 728, 2048),
    "xception41": (64, 128, 256, 728, 2048),
    "xception65": (64, 128, 256, 728, 2048),
    "xception41p": (64, 128, 256, 728, 2048),
    "xception65p": (64, 128, 256, 728, 2048),
    "xception71": (64, 256, 728, 728, 2048),
}
REDUCTIONS = (2, 4, 8, 16, 32)


def images(size: tuple[int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *size, generator=generator) * 2 - 1


def small_input(name: str) -> tuple[int, int]:
    """Aligned models pad symmetrically (any size halves exactly when even); the paper's stem is valid-padded."""
    return (79, 99) if name == "xception" else (64, 96)


def expected_sizes(name: str, size: tuple[int, int]) -> list[tuple[int, int]]:
    """Feature map sizes at reductions 2..32 worked out from the architectures, not from the code under test."""
    # the paper's stem: two valid 3x3 convs, the first with stride 2; the aligned one: a symmetric stride-2 conv.
    # Every later halving is 'same' (ceil).
    side = [(s - 3) // 2 + 1 - 2 if name == "xception" else math.ceil(s / 2) for s in size]
    sizes = [tuple(side)]
    for _ in range(4):
        side = [math.ceil(s / 2) for s in side]
        sizes.append(tuple(side))
    return sizes


@pytest.fixture(scope="module")
def models() -> Callable[[str], nn.Module]:
    """Each model at output stride 32, built once for the module, in eval mode: tests must not change it."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            torch.manual_seed(ALL_MODELS.index(name))
            cache[name] = xception.create_model(name).eval()
        return cache[name]

    return get


def run(module: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return module(x)


def assert_all_equal(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.shape == e.shape, i
        assert torch.equal(a, e), i


def dilations(model: nn.Module) -> set[int]:
    return {m.dilation[0] for m in model.modules() if isinstance(m, nn.Conv2d)}


# --- feature_info and features_only --------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_MODELS)
def test_feature_info(name: str, models) -> None:
    model = models(name)
    info = model.feature_info
    assert [i["reduction"] for i in info] == list(REDUCTIONS)
    assert tuple(i["num_chs"] for i in info) == CHANNELS[name]
    modules = dict(model.named_modules())
    for entry in info:
        assert entry["module"] in modules, entry
    assert info[-1]["num_chs"] == model.num_features


@pytest.mark.parametrize("name", ALL_MODELS)
def test_features_only_maps_are_the_tapped_module_outputs(name: str, models) -> None:
    model = models(name)
    size = (128, 160)
    x = images(size)
    # The output of each feature_info module, captured by hooks while the full model runs (cloned: a later
    # in-place operation must not change what was captured).
    captured: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(entry["module"]).register_forward_hook(
        lambda _m, _i, out, key=entry["module"]: captured.__setitem__(key, out.clone()))
        for entry in model.feature_info]
    try:
        run(model, x)
    finally:
        for handle in handles:
            handle.remove()
    features = FeatureExtractor(model)
    assert features.feature_info == model.feature_info
    maps = run(features, x)
    assert_all_equal(maps, [captured[entry["module"]] for entry in model.feature_info])
    sizes = expected_sizes(name, size)
    if name != "xception":
        assert sizes == [(64, 80), (32, 40), (16, 20), (8, 10), (4, 5)]
    for feature, entry, side in zip(maps, model.feature_info, sizes, strict=True):
        assert feature.shape == (2, entry["num_chs"], *side)
    # the same shapes through create_model(features_only=True) (on the meta device: shapes only, no compute),
    # and through forward_intermediates
    built = xception.create_model(name, features_only=True, device="meta")
    assert isinstance(built, FeatureExtractor) and built.feature_info == model.feature_info
    assert {entry["module"] for entry in built.feature_info} <= dict(built.named_modules()).keys()
    assert [m.shape for m in built(x.to("meta"))] == [m.shape for m in maps]
    with torch.no_grad():
        _, intermediates = model.forward_intermediates(x)
    assert [m.shape for m in intermediates] == [m.shape for m in maps]


# --- output stride -------------------------------------------------------------------------------------

@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_stride(name: str, output_stride: int, models) -> None:
    base = models(name)
    size = small_input(name)
    x = images(size, seed=1)
    model = xception.create_model(name, output_stride=output_stride).eval()
    # the same weights at every output stride
    state, base_state = model.state_dict(), base.state_dict()
    assert list(state) == list(base_state)
    assert all(state[k].shape == base_state[k].shape for k in state)
    model.load_state_dict(base_state)

    info = model.feature_info
    assert [i["reduction"] for i in info] == [min(r, output_stride) for r in REDUCTIONS]
    assert [i["num_chs"] for i in info] == [i["num_chs"] for i in base.feature_info]
    assert max(dilations(model)) == 32 // output_stride
    maps, base_maps = run(FeatureExtractor(model), x), run(FeatureExtractor(base), x)
    sizes = expected_sizes(name, size)
    final = sizes[REDUCTIONS.index(output_stride)]
    for i, reduction in enumerate(REDUCTIONS):
        assert maps[i].shape[1] == CHANNELS[name][i]
        if reduction <= output_stride:  # before the stride would exceed output_stride: nothing changes
            assert maps[i].shape[2:] == sizes[i]
            assert torch.equal(maps[i], base_maps[i]), reduction
        else:
            assert maps[i].shape[2:] == final, reduction
    with torch.no_grad():
        assert model.forward_features(x).shape[2:] == final
        out = model(x)
    assert out.shape == run(base, x).shape == (2, 1000)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_stride_32_is_the_default(name: str, models) -> None:
    base = models(name)
    assert base.output_stride == 32
    assert [i["reduction"] for i in base.feature_info] == list(REDUCTIONS)
    assert max(dilations(base)) == 1
    assert repr(xception.create_model(name, output_stride=32, device="meta")) == repr(base)


def test_output_stride_12_is_refused() -> None:
    for name in ("xception", "xception41"):
        with pytest.raises(ValueError, match=r"output_stride must be one of \(8, 16, 32\), got 12"):
            xception.create_model(name, output_stride=12)


def test_keras_network_has_no_dilation_at_output_stride_32() -> None:
    """The paper's network at output stride 32 (the Keras-exact one) is untouched by the dilation machinery."""
    model = xception.create_model("xception", output_stride=32)
    assert dilations(model) == {1}
    pools = [m for m in model.modules() if isinstance(m, MaxPool2dSame)]
    assert len(pools) == 4 and all(p.stride == 2 and p.kernel_size == 3 for p in pools)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    # the check has teeth: at output stride 16 the last pool keeps the resolution and the last blocks dilate
    dilated = xception.create_model("xception", output_stride=16)
    assert dilations(dilated) == {1, 2}
    assert [p.stride for p in dilated.modules() if isinstance(p, MaxPool2dSame)] == [2, 2, 2, 1]


# --- multi-grid ----------------------------------------------------------------------------------------

def last_block_dilations(model: nn.Module) -> tuple[int, ...]:
    last = list(model.blocks.children())[-1]
    convs = [m for name, m in last.layers.named_children() if name.startswith("sepconv") and name[7:].isdigit()]
    return tuple(conv.depthwise.dilation[0] for conv in convs)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_multi_grid(name: str, models) -> None:
    base = models(name)
    grid = (1, 2) if name == "xception" else (1, 2, 4)
    assert last_block_dilations(base) == (1,) * len(grid)
    model = xception.create_model(name, multi_grid=grid).eval()
    model.load_state_dict(base.state_dict())
    assert last_block_dilations(model) == grid
    others = [m.dilation[0] for block in list(model.blocks.children())[:-1]
              for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert set(others) == {1}  # only the last block changes
    assert model.multi_grid == grid
    x = images(small_input(name), seed=2)
    with torch.no_grad():
        assert model.forward_features(x).shape == base.forward_features(x).shape
        assert not torch.allclose(model(x), base(x))
    # multiplied with the output stride's dilation
    dilated = xception.create_model(name, multi_grid=grid, output_stride=16, device="meta")
    assert last_block_dilations(dilated) == tuple(2 * rate for rate in grid)


@pytest.mark.parametrize(("name", "grids"), [
    ("xception", [(1, 2, 4), (1,), (0, 1), (1, -2)]),
    ("xception41p", [(1, 2), (1, 2, 4, 8), (1, 0, 2), (1, 2, -4)]),
])
def test_multi_grid_is_checked(name: str, grids: list[tuple[int, ...]]) -> None:
    """One positive rate per separable convolution of the last block: a wrong length or a zero rate is refused."""
    for grid in grids:
        with pytest.raises(ValueError, match=r"multi_grid needs \d positive integer rates"):
            xception.create_model(name, multi_grid=grid)


# --- out_indices ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["xception", "xception41"])
def test_out_indices(name: str, models) -> None:
    model = models(name)
    x = images(small_input(name), seed=3)
    full = run(FeatureExtractor(model), x)
    subset = xception.create_model(name, features_only=True, out_indices=(1, 3))
    assert [i["reduction"] for i in subset.feature_info] == [4, 16]
    assert len(subset.blocks) == model.tap_blocks[3] + 1  # the blocks after the last map are not built in
    subset.load_state_dict({k: v for k, v in model.state_dict().items() if k in subset.state_dict()})
    assert_all_equal(run(subset.eval(), x), [full[1], full[3]])
    last = FeatureExtractor(model, (-1,))
    assert last.feature_info == [model.feature_info[-1]]
    assert_all_equal(run(last, x), [full[-1]])
    assert_all_equal(run(FeatureExtractor(model, (0, -2)), x), [full[0], full[3]])
    for bad in ((5,), (0, -6)):
        with pytest.raises(ValueError, match="has 5 feature maps"):
            xception.create_model(name, features_only=True, out_indices=bad)
    with pytest.raises(ValueError, match="features_only"):
        xception.create_model(name, out_indices=(1, 3))


# --- forward_intermediates -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_intermediates(name: str, models) -> None:
    model = models(name)
    x = images(small_input(name), seed=4)
    # independent reference: run the blocks one by one, copying the output of each tap block
    expected = []
    with torch.no_grad():
        y = x
        for index, block in enumerate(model.blocks):
            y = block(y)
            if index in model.tap_blocks:
                expected.append(y.clone())
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert_all_equal(maps, expected)
        assert_all_equal(maps, FeatureExtractor(model)(x))
        _, last_two = model.forward_intermediates(x, indices=2)
        assert_all_equal(last_two, expected[-2:])
        assert_all_equal(model.forward_intermediates(x, intermediates_only=True), expected)
        calls: list[str] = []
        handle = list(model.blocks.children())[-1].register_forward_hook(lambda *_: calls.append("last"))
        try:
            early = model.forward_intermediates(x, indices=[0, 2], stop_early=True)
        finally:
            handle.remove()
    assert isinstance(early, list)
    assert_all_equal(early, [expected[0], expected[2]])
    assert calls == []  # the blocks after the last requested map did not run


# --- TorchScript, export, compile ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["xception", "xception41p"])
def test_feature_model_scripts_exports_and_compiles(name: str) -> None:
    features = xception.create_model(name, features_only=True).eval()
    x = images((96, 96) if name == "xception" else (64, 64), seed=5)
    expected = run(features, x)
    assert len(expected) == 5
    assert_all_equal(run(torch.jit.script(features), x), expected)
    exported = torch.export.export(features, (x,))
    for actual, wanted in zip(run(exported.module(), x), expected, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)
    try:
        compiled = torch.compile(features, backend="eager")
        outputs = run(compiled, x)
    finally:
        torch._dynamo.reset()
    assert len(outputs) == len(expected)
    for actual, wanted in zip(outputs, expected, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)


# --- stochastic depth ----------------------------------------------------------------------------------

def drop_rate(block: nn.Module) -> float:
    return block.drop_path.rate if isinstance(block.drop_path, DropPath) else 0.0


def residual_blocks(model: nn.Module) -> list[ResidualBlock]:
    return [b for b in model.blocks if isinstance(b, ResidualBlock) and b.skip]


@pytest.mark.parametrize("name", ["xception", "xception41", "xception71"])
def test_drop_path_rates_rise_linearly(name: str) -> None:
    model = xception.create_model(name, drop_path_rate=0.3, device="meta")
    blocks = residual_blocks(model)
    rates = [drop_rate(b) for b in blocks]
    assert isinstance(blocks[0].drop_path, nn.Identity) and rates[0] == 0.0
    assert all(isinstance(b.drop_path, DropPath) for b in blocks[1:])
    steps = [b - a for a, b in itertools.pairwise(rates)]
    assert all(step > 0 for step in steps)
    assert max(steps) - min(steps) < 1e-9  # evenly spaced
    assert 0.0 < rates[-1] <= 0.3 + 1e-12
    plain = [b for b in model.blocks if isinstance(b, ResidualBlock) and not b.skip]
    assert plain and all(isinstance(b.drop_path, nn.Identity) for b in plain)
    assert all(isinstance(b.drop_path, nn.Identity) for b in residual_blocks(xception.create_model(name,
                                                                                                    device="meta")))


@pytest.mark.parametrize("name", ["xception", "xception41"])
def test_last_residual_block_gets_the_full_drop_path_rate(name: str) -> None:
    model = xception.create_model(name, drop_path_rate=0.3, device="meta")
    assert drop_rate(residual_blocks(model)[-1]) == pytest.approx(0.3)


@pytest.mark.parametrize("name", ["xception", "xception41"])
def test_drop_path_is_random_in_training_only(name: str) -> None:
    options = {"middle_repeats": 1} if name == "xception" else {}
    x = images((96, 96) if name == "xception" else (64, 64), batch=4, seed=6)
    model = xception.create_model(name, drop_path_rate=0.5, **options)
    with torch.no_grad():
        model.train()
        assert not torch.allclose(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))
        # without stochastic depth, training mode is deterministic: the difference above is drop path's
        plain = xception.create_model(name, **options).train()
        assert torch.equal(plain(x), plain(x))
    with pytest.raises(ValueError, match="drop_path_rate"):
        xception.create_model(name, drop_path_rate=1.0)


# --- gradient checkpointing ----------------------------------------------------------------------------

@pytest.fixture
def checkpoint_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = backbone.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(backbone, "checkpoint", counting)
    return calls


@pytest.mark.parametrize(("name", "options", "size"), [
    ("xception", {"middle_repeats": 1}, (96, 96)),
    ("xception41p", {}, (64, 64)),
])
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(name: str, options: dict, size: tuple[int, int],
                                                                 checkpoint_calls: list[int]) -> None:
    model = xception.create_model(name, num_classes=10, **options).train()
    x = images(size, seed=7)
    target = torch.randn(2, 10, generator=torch.Generator().manual_seed(8))

    def forward_backward() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out * target).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out, grads = forward_backward()
    assert checkpoint_calls == []
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = forward_backward()
    assert len(checkpoint_calls) == len(model.blocks)  # the checkpointed path really ran
    torch.testing.assert_close(out_ckpt, out, rtol=1e-6, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys()
    for n, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[n], grad, rtol=1e-6, atol=1e-6 * grad.abs().max().item(), msg=n)
    assert any(grad.abs().max() > 0 for grad in grads.values())

    # in evaluation mode it is inert
    checkpoint_calls.clear()
    model.eval()
    with torch.no_grad():
        inert = model(x)
        model.set_grad_checkpointing(False)
        plain = model(x)
    assert checkpoint_calls == []
    assert torch.equal(inert, plain)
