"""Nested training state (optimizer, EMA, RNG states, run records) <-> a JSON skeleton and flat tensors: how
checkpoints store everything without pickling anything. Plain JSON loses tuples, dict keys that are not strings
(the optimizer's integer parameter ids) and the floats inf, -inf and nan; the skeleton keeps them with markers.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import torch

from ..errors import XceptionError

# JSON objects with exactly one of these keys stand for a value plain JSON cannot hold.
TENSOR, NDARRAY, FLOAT, TUPLE, DICT = "__tensor__", "__ndarray__", "__float__", "__tuple__", "__dict__"
MARKERS = frozenset({TENSOR, NDARRAY, FLOAT, TUPLE, DICT})


class CheckpointError(XceptionError, RuntimeError):
    """A checkpoint that cannot be written or read: missing, truncated or corrupt files, a mismatched pair, an
    unknown format version, or a value that cannot be stored."""


def flatten_state(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure of dicts, lists, tuples, tensors and JSON scalars into a JSON-able skeleton and
    a flat ``{path: tensor}`` dict. Tensors become ``{"__tensor__": path}`` placeholders, with paths such as
    ``optimizer/state/3/exp_avg``; each tensor is copied to a contiguous CPU tensor of its own (safetensors
    refuses views of shared memory). :func:`unflatten_state` is the inverse."""
    tensors: dict[str, torch.Tensor] = {}

    def key_for(path: str) -> str:
        key, number = path, 1
        while key in tensors:  # "3" and 3 as keys of one dict give the same path
            number += 1
            key = f"{path}~{number}"
        return key

    def join(path: str, part: object) -> str:
        return f"{path}/{part}" if path else str(part)

    def encode(value: Any, path: str) -> Any:
        if value is None or type(value) in (bool, int, str):
            return value
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {FLOAT: repr(float(value))}
        if isinstance(value, torch.Tensor):
            key = key_for(path)
            tensors[key] = storable_tensor(value, path)
            return {TENSOR: key}
        if isinstance(value, np.ndarray):
            key = key_for(path)
            if value.dtype == object:
                raise CheckpointError(f"cannot store {path or 'the value'}: a NumPy array of Python objects")
            tensors[key] = storable_tensor(torch.from_numpy(np.ascontiguousarray(value)), path)
            return {NDARRAY: key}
        if isinstance(value, np.generic):
            return encode(value.item(), path)
        if isinstance(value, int):  # subclasses such as IntEnum come back as the plain value
            return int(value)
        if isinstance(value, str):
            return str(value)
        if isinstance(value, list):
            return [encode(item, join(path, index)) for index, item in enumerate(value)]
        if isinstance(value, tuple):
            return {TUPLE: [encode(item, join(path, index)) for index, item in enumerate(value)]}
        if isinstance(value, dict):
            if all(type(key) is str for key in value) and not (len(value) == 1 and next(iter(value)) in MARKERS):
                return {key: encode(item, join(path, key)) for key, item in value.items()}
            items = []
            for key, item in value.items():
                if isinstance(key, (torch.Tensor, np.ndarray)):
                    raise CheckpointError(f"cannot store {path or 'the value'}: a tensor used as a dict key")
                items.append([encode(key, join(path, "key")), encode(item, join(path, key))])
            return {DICT: items}
        raise CheckpointError(f"cannot store {path or 'the value'}: a {type(value).__qualname__}, "
                              "where checkpoints hold tensors, numbers, strings, None, lists, tuples and dicts")

    skeleton = encode(tree, prefix)
    return skeleton, tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild what :func:`flatten_state` split, with its types: tuples, integer dict keys, inf and nan."""

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(item) for item in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1 and next(iter(value)) in MARKERS:
            (marker, content), = value.items()
            if marker in (TENSOR, NDARRAY):
                if content not in tensors:
                    raise CheckpointError(f"the structure refers to a tensor {content!r} that is not in the file")
                return tensors[content] if marker == TENSOR else tensors[content].numpy()
            if marker == FLOAT:
                return float(content)
            if marker == TUPLE:
                return tuple(decode(item) for item in content)
            return {decode(key): decode(item) for key, item in content}
        return {key: decode(item) for key, item in value.items()}

    return decode(skeleton)


def storable_tensor(tensor: torch.Tensor, path: str) -> torch.Tensor:
    """A contiguous CPU copy sharing memory with nothing else."""
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise CheckpointError(f"cannot store {path}: a {tensor.layout} tensor; only dense tensors")
    tensor = tensor.detach().resolve_conj().resolve_neg()
    if tensor.device.type == "cpu":
        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor.to("cpu").contiguous()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of ``tensors``: catches data corrupted on disk, which
    safetensors' header checks do not."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


