"""torch.fx symbolic tracing of every model of the family, which timm's model contract asks for (torchvision's
create_feature_extractor and timm's FX feature extraction trace the model): the traced graph computes what the model
computes, forward and backward, at input sizes whose TensorFlow 'same' padding differs, and still refuses bad
input. The size-dependent parts (input checks, 'same' padding) are calls in the graph (torch.fx.wrap), run on each
input, so one trace serves every size."""

from __future__ import annotations

import pytest
import torch
from torch.fx import symbolic_trace
from torchvision.models.feature_extraction import create_feature_extractor

import xception
from xception.errors import InvalidArgumentError

pytestmark = pytest.mark.usefixtures("one_thread")  # small inputs: extra threads only contend on a busy CPU


def sizes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """Two small sizes of opposite parity in each dimension: where 'same' padding is asymmetric, it moves."""
    side = model.min_input_size
    return [(side + 1, side + 4), (side + 2, side + 3)]


def images(size: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", xception.list_models())
def test_every_model_traces_and_its_graph_computes_the_model(name: str) -> None:
    torch.manual_seed(0)
    model = xception.create_model(name, num_classes=3).eval()
    traced = symbolic_trace(model)
    x = images(sizes(model)[0], 0)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    with pytest.raises(InvalidArgumentError, match="too small"):
        traced(images((16, 16), 0))


# One of each kind: the paper's network (asymmetric 'same' padding in its pools), an aligned one, a DeepLabV3+.
@pytest.mark.parametrize("name", ["xception", "xception41p", "deeplabv3plus_xception"])
def test_the_graph_trains_as_the_model_at_every_size(name: str) -> None:
    torch.manual_seed(0)
    model = xception.create_model(name, num_classes=3)  # training mode: BatchNorm on the batch's statistics
    traced = symbolic_trace(model)
    for seed, size in enumerate(sizes(model)):
        x = images(size, seed)
        torch.manual_seed(seed)  # the same dropout masks in both
        expected = model(x)
        expected.square().mean().backward()
        gradients = {key: p.grad.clone() for key, p in model.named_parameters()}
        model.zero_grad()
        torch.manual_seed(seed)
        actual = traced(x)
        actual.square().mean().backward()
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
        for key, parameter in traced.named_parameters():
            torch.testing.assert_close(parameter.grad, gradients[key], rtol=1e-6, atol=1e-7, msg=key)
        model.zero_grad()
    if name.startswith("deeplab"):
        with pytest.raises(InvalidArgumentError, match="batches of two or more"):
            traced(images(sizes(model)[0], 0)[:1])


@pytest.mark.parametrize("name", ["xception", "xception41p"])
def test_torchvision_feature_extraction_and_torchscript(name: str) -> None:
    model = xception.create_model(name).eval()
    taps = {info["module"]: str(info["reduction"]) for info in model.feature_info}
    extractor = create_feature_extractor(model, return_nodes=taps)
    scripted = torch.jit.script(model)
    for seed, size in enumerate(sizes(model)):
        x = images(size, seed)
        with torch.no_grad():
            expected = model.forward_intermediates(x, intermediates_only=True)
            features = extractor(x)
            logits, scripted_logits = model(x), scripted(x)
        assert list(features) == [str(info["reduction"]) for info in model.feature_info]
        for actual, wanted in zip(features.values(), expected, strict=True):
            torch.testing.assert_close(actual, wanted, rtol=0, atol=0)
        torch.testing.assert_close(scripted_logits, logits, rtol=0, atol=0)


def test_timm_fx_feature_extraction_of_the_registered_model() -> None:
    timm = pytest.importorskip("timm")
    import xception.timm_interop  # noqa: F401  registers xception_keras with timm

    torch.manual_seed(0)
    by_graph = timm.create_model("xception_keras", features_only=True, feature_cls="fx").eval()
    torch.manual_seed(0)
    by_hooks = timm.create_model("xception_keras", features_only=True).eval()
    x = images((80, 83), 3)
    with torch.no_grad():
        for actual, wanted in zip(by_graph(x), by_hooks(x), strict=True):
            torch.testing.assert_close(actual, wanted, rtol=0, atol=0)
