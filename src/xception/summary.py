"""A Keras-style summary of a model: one row per layer with its output shape, parameters and MACs.

Conventions, so the numbers can be compared with the paper and with Keras's ``model.summary()``:

- Rows are layers as a reader of the Keras model sees them. A :class:`SeparableConv2d` is one row (Keras's
  ``SeparableConv2D`` is one layer): its parameters and MACs include everything inside it. Every other leaf
  module is one row, in registration order. The classifier head pools inside ``forward`` without a module,
  so a synthetic ``head.global_pool`` row shows the pooled shape.
- MACs are multiply-accumulates for ONE image, counted for convolutions
  (``C_out * H_out * W_out * C_in / groups * kh * kw``) and linear layers (``in * out`` per output position)
  only. Biases, BatchNorm, activations, pooling and residual additions count 0, as in published counts;
  FLOPs are about twice the MACs.
- Params are ``nn.Parameter`` elements. BatchNorm's running mean and variance are buffers, reported apart:
  Keras counts them as non-trainable parameters, so its total is ``total_params + buffers``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .errors import UnknownOptionError
from .layers import SeparableConv2d

__all__ = ["LayerRow", "ModelSummary", "summarize"]

HEADERS = ("Layer", "Type", "Output shape", "Params", "MACs")
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
BN_STATISTICS = ("running_mean", "running_var")  # num_batches_tracked is bookkeeping, not a statistic


@dataclass(frozen=True)
class LayerRow:
    """One layer. ``output_shape`` excludes the batch dimension and is ``()`` for a layer that did not run."""

    name: str  # module path, e.g. "blocks.block2.layers.sepconv1"
    kind: str  # class name, e.g. "SeparableConv2d"
    output_shape: tuple[int, ...]
    params: int  # parameters owned by this row, trainable or not
    macs: int  # multiply-accumulates for one image


@dataclass(frozen=True)
class ModelSummary:
    rows: list[LayerRow]
    input_size: tuple[int, int, int]  # (C, H, W)
    total_params: int
    trainable_params: int
    buffers: int  # BatchNorm running statistics, without num_batches_tracked
    total_macs: int

    def to_table(self) -> str:
        """An aligned text table followed by the totals."""
        body = [(r.name, r.kind, format_shape(r.output_shape), f"{r.params:,}", f"{r.macs:,}") for r in self.rows]
        widths = [max(map(len, column)) for column in zip(HEADERS, *body, strict=True)]

        def line(cells: tuple[str, ...]) -> str:
            # Text columns align left, numbers right.
            padded = (c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
            return "  ".join(padded)

        rule = "-" * len(line(HEADERS))
        totals = [
            f"Total params: {self.total_params:,}",
            f"Trainable params: {self.trainable_params:,}",
        ]
        if self.trainable_params != self.total_params:
            totals.append(f"Frozen params: {self.total_params - self.trainable_params:,}")
        totals += [
            f"Non-trainable (BN statistics): {self.buffers:,}",
            f"MACs per image: {format_count(self.total_macs)}",
            f"Input: {format_shape(self.input_size)}",
        ]
        return "\n".join([line(HEADERS), rule, *map(line, body), rule, *totals])

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, ints and strings only, so ``json.dumps`` takes it as is."""
        rows = [{**asdict(row), "output_shape": list(row.output_shape)} for row in self.rows]
        return {"input_size": list(self.input_size), "total_params": self.total_params,
                "trainable_params": self.trainable_params, "buffers": self.buffers,
                "total_macs": self.total_macs, "rows": rows}


def format_shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "-"


def format_count(n: int) -> str:
    """``8.37 G (8,367,...)``: readable, with the exact integer for comparisons."""
    for scale, unit in ((10**9, "G"), (10**6, "M")):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({n:,})"
    return f"{n:,}"


def layer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules that get a row: separable convolutions whole, every other module without children.

    Empty containers (the head's ``fc_layers`` without hidden layers) are structure, not layers.
    """
    inside: set[nn.Module] = set()
    for name, module in model.named_modules():
        if module in inside:
            continue
        if isinstance(module, SeparableConv2d):
            inside.update(m for m in module.modules() if m is not module)
            yield name, module
        elif next(module.children(), None) is None and not isinstance(module, CONTAINERS):
            yield name, module


def count_macs(module: nn.Module, output: torch.Tensor) -> int:
    """MACs of one call on a batch of one image (the convention in the module docstring)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output[0].numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output[0].numel() * module.in_features
    return 0


def output_shape(output: Any) -> tuple[int, ...]:
    return tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else ()


def summarize(model: nn.Module, input_size: tuple[int, int] | int = 299, in_chans: int | None = None) -> ModelSummary:
    """Run one zero image through ``model`` in eval mode and tabulate its layers.

    Hooks are always removed and every module's training flag restored, even when the forward fails (an
    input below the model's minimum size raises the model's own error).
    """
    height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    channels = getattr(model, "in_chans", None) if in_chans is None else in_chans
    if channels is None:
        raise UnknownOptionError(f"{type(model).__name__} has no in_chans attribute; pass in_chans")
    layers = list(layer_modules(model))
    owner = {sub: name for name, module in layers for sub in module.modules()}
    shapes: dict[str, tuple[int, ...]] = {}
    macs: dict[str, int] = defaultdict(int)
    pooled: dict[str, LayerRow] = {}  # global pooling that happens inside a head's forward, by head name

    def record_shape(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            shapes[name] = output_shape(output)
        return hook

    def record_macs(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            macs[name] += count_macs(module, output)
        return hook

    def record_pool(name: str, mode: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            kind = "GlobalAvgPool2d" if mode == "avg" else "GlobalMaxPool2d"
            pooled[name] = LayerRow(f"{name}.global_pool" if name else "global_pool", kind, (args[0].shape[1],), 0, 0)
        return hook

    flags = [(module, module.training) for module in model.modules()]
    handles = []
    try:
        for name, module in layers:
            handles.append(module.register_forward_hook(record_shape(name)))
        for module, name in owner.items():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                handles.append(module.register_forward_hook(record_macs(name)))
        for name, module in model.named_modules():
            mode = getattr(module, "global_pool", None)
            if mode in ("avg", "max"):
                handles.append(module.register_forward_pre_hook(record_pool(name, mode)))
        reference = next(model.parameters(), None)
        x = torch.zeros(1, channels, height, width, device=reference.device if reference is not None else None,
                        dtype=reference.dtype if reference is not None else None)
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags:
            module.training = training

    rows: list[LayerRow] = []
    for name, module in layers:
        for head in [h for h in pooled if name.startswith(f"{h}." if h else "")]:
            rows.append(pooled.pop(head))  # the pooling row goes before the head's first layer
        rows.append(LayerRow(name, type(module).__name__, shapes.get(name, ()),
                             sum(p.numel() for p in module.parameters()), macs[name]))
    rows += pooled.values()
    return ModelSummary(
        rows=rows,
        input_size=(channels, height, width),
        total_params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        buffers=sum(b.numel() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in BN_STATISTICS),
        total_macs=sum(row.macs for row in rows),
    )


def model_table(img_size: int = 299) -> str:
    """A markdown table of every model: size, cost, feature maps and registered weights (the README's)."""
    from .models import create_model, list_models
    from .weights import get_weights, list_weights

    lines = [f"| model | parameters | GMACs at {img_size} | feature channels | feature strides | weights |",
             "|---|---:|---:|---|---|---|"]
    for name in list_models("classification"):
        model = create_model(name)
        summary = summarize(model, img_size)
        channels = ", ".join(str(info["num_chs"]) for info in model.feature_info)
        strides = ", ".join(str(info["reduction"]) for info in model.feature_info)
        weights = []
        for weights_name in list_weights(name):
            registered = get_weights(name, weights_name)
            metrics = registered.meta["metrics"]["ImageNet-1k"]
            top5 = f" / top-5 {metrics['top5']}" if "top5" in metrics else ""
            weights.append(f"`{weights_name}`: {registered.meta['source']}, top-1 {metrics['top1']}{top5}")
        lines.append(f"| `{name}` | {summary.total_params:,} | {summary.total_macs / 1e9:.2f} | {channels} | "
                     f"{strides} | {'; '.join(weights) or '-'} |")
    return "\n".join(lines)
