"""The checker of the models' options: a value is held to its declaration, a dataclass field, before it reaches a layer.

Without it ``create_model("xception", middle_repeats="abc")``, or ``--set middle_repeats=abc``, ends in a TypeError
from deep inside the model's construction. With it, it is one line that names the option, what was wrong and what is
accepted: ``middle_repeats must be an integer >= 0, got 'abc'``. One checker serves every model and every way in
(the Python API, ``--set``, a checkpoint's saved architecture), driven by the declarations:

- the field's type hint: ``int`` (not a bool, though Python's True is an int), ``float`` (an int is accepted and
  made a float), ``bool``, ``Literal[...]`` (the choices), ``tuple[int, int]`` or ``tuple[int, ...]`` (a list is
  accepted and made a tuple: command-line users write ``[16, 32]`` as often as ``(16, 32)``), ``X | None``;
- the field's metadata, from :func:`allowed`: the bounds of a number, or of each item of a tuple, what an item is
  called, and whether a tuple may be empty.

Whatever a single field cannot say (a value that depends on another option, or on the network's layout) stays with
the model, which checks it once the types are known to be right.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from ..errors import InvalidArgumentError, UnknownOptionError

REFUSED = object()  # what conform returns for a value of another type
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
BOUNDS = (("minimum", operator.ge), ("maximum", operator.le), ("above", operator.gt), ("below", operator.lt))


def allowed(*, minimum: float | None = None, maximum: float | None = None, above: float | None = None,
            below: float | None = None, unit: str | None = None, nonempty: bool = False) -> dict[str, Any]:
    """A field's metadata for the checker. ``minimum``/``maximum`` (inclusive) and ``above``/``below`` (exclusive)
    bound a number, or each item of a tuple; ``unit`` names one item of a tuple in the messages ("width");
    ``nonempty``: a tuple needs at least one item."""
    return {"minimum": minimum, "maximum": maximum, "above": above, "below": below, "unit": unit,
            "nonempty": nonempty}


@dataclass(frozen=True)
class NetworkOptions:
    """The arguments that :func:`~xception.models.create_model` gives every classification network's builder, as the
    checker holds them; the defaults are create_model's. The choices are those of
    :data:`~xception.models.backbone.GLOBAL_POOLS` and :data:`~xception.models.backbone.OUTPUT_STRIDES`, written out
    so that checking a ``--set`` value imports no torch."""

    num_classes: int = field(default=1000, metadata=allowed(minimum=0))  # 0: the pooled features, no classifier
    in_chans: int = field(default=3, metadata=allowed(minimum=1))
    global_pool: Literal["avg", "max", ""] = "avg"
    drop_rate: float = field(default=0.0, metadata=allowed(minimum=0, below=1))
    drop_path_rate: float = field(default=0.0, metadata=allowed(minimum=0, below=1))
    output_stride: Literal[8, 16, 32] = 32
    # How many rates, and their range, depend on the network's last block: plan_blocks checks them.
    multi_grid: tuple[int, ...] | None = None


@cache
def declared(spec: type) -> dict[str, tuple[Any, Mapping[str, Any]]]:
    """Each field of the dataclass ``spec``: its type hint (resolved from its string) and its metadata."""
    hints = typing.get_type_hints(spec)
    return {item.name: (hints[item.name], item.metadata) for item in dataclasses.fields(spec)}


def refuse_unknown(spec: type, options: Mapping[str, Any], *, owner: str) -> None:
    """Raise :class:`UnknownOptionError`, listing the valid names, for a name that ``spec`` does not declare."""
    valid = declared(spec)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UnknownOptionError(f"unknown {owner} option(s) {unknown}; valid options are {sorted(valid)}")


def check_options(spec: type, options: Mapping[str, Any], *, owner: str) -> dict[str, Any]:
    """``options`` held to the fields of the dataclass ``spec`` of the same names, normalised (a list as a tuple, an
    int as a float). A name that ``spec`` lacks raises :class:`UnknownOptionError` (``owner`` names the model), a
    value of the wrong type or out of range :class:`InvalidArgumentError`."""
    refuse_unknown(spec, options, owner=owner)
    checked: dict[str, Any] = {}
    for name, value in options.items():
        checked[name], problem = judge(*declared(spec)[name], value)
        if problem:
            raise InvalidArgumentError(f"{name} {problem}")
    return checked


def check_fields(config: Any) -> None:
    """Hold every field of the dataclass instance ``config`` (frozen or not) to its declaration and store its
    normalised value: what a config's ``__post_init__`` calls."""
    values = {item.name: getattr(config, item.name) for item in dataclasses.fields(config)}
    for name, value in check_options(type(config), values, owner=type(config).__name__).items():
        object.__setattr__(config, name, value)


def value_problem(spec: type, name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the field ``name`` of ``spec`` ("must be >= 0, got -1"), or None."""
    return judge(*declared(spec)[name], value)[1]


def judge(hint: Any, metadata: Mapping[str, Any], value: Any) -> tuple[Any, str | None]:
    """``value`` normalised for ``hint`` and what is wrong with it (None if nothing): its type first, in the words
    of everything the field accepts, then, the type being right, the bound it breaks."""
    for kind in union_arms(hint):
        normalised = conform(kind, value)
        if normalised is not REFUSED:
            return normalised, range_problem(kind, metadata, normalised, value)
    return value, f"must be {describe(hint, metadata)}, got {value!r}"


def union_arms(hint: Any) -> tuple[Any, ...]:
    """The types a union hint allows (``int | None``: int, NoneType), or the hint alone."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def conform(kind: Any, value: Any) -> Any:
    """``value`` as the type ``kind`` (not a union) takes it, or :data:`REFUSED`."""
    origin = typing.get_origin(kind)
    if origin is Literal:  # by type too: 1.0 == 1 and True == 1, but neither is the choice 1
        return value if any(type(value) is type(choice) and value == choice for choice in typing.get_args(kind)) \
            else REFUSED
    if origin is tuple:
        if not isinstance(value, tuple | list):
            return REFUSED
        kinds = item_kinds(kind, len(value))
        if len(kinds) != len(value):
            return REFUSED
        items = tuple(conform(item_kind, item) for item_kind, item in zip(kinds, value, strict=True))
        return REFUSED if any(item is REFUSED for item in items) else items
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else REFUSED
    if kind is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if number and math.isfinite(value) else REFUSED
    if kind is type(None):
        return value if value is None else REFUSED
    if isinstance(kind, type):
        return value if isinstance(value, kind) else REFUSED
    return value  # Any, or a form no declaration uses: not checked


def item_kinds(kind: Any, length: int) -> tuple[Any, ...]:
    """The item types of a tuple hint: ``tuple[int, int]``'s two, ``tuple[int, ...]``'s ``length``."""
    kinds = typing.get_args(kind)
    return (kinds[0],) * length if len(kinds) == 2 and kinds[1] is Ellipsis else kinds


def range_problem(kind: Any, metadata: Mapping[str, Any], normalised: Any, value: Any) -> str | None:
    """The bound of ``metadata`` that a value of the right type breaks, said as a problem, or None."""
    if isinstance(normalised, tuple):
        if not normalised and metadata.get("nonempty"):
            return f"needs at least one {metadata.get('unit') or 'item'}, got {value!r}"
        if all(within(item, metadata) for item in normalised):
            return None
        return f"must be {number_words(item_kinds(kind, 1)[0], metadata, plural=True)}, got {value!r}"
    if isinstance(normalised, int | float) and not isinstance(normalised, bool) and not within(normalised, metadata):
        return f"must be{bound_words(metadata)}, got {value!r}"
    return None


def within(value: Any, metadata: Mapping[str, Any]) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return True
    return all(metadata.get(key) is None or holds(value, metadata[key]) for key, holds in BOUNDS)


def describe(hint: Any, metadata: Mapping[str, Any]) -> str:
    """What a field accepts, in words: "an integer >= 0", "two widths (positive integers)", "... or None"."""
    *others, last = (describe_kind(kind, metadata) for kind in union_arms(hint))
    return f"{', '.join(others)} or {last}" if others else last


def describe_kind(kind: Any, metadata: Mapping[str, Any]) -> str:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return f"one of {typing.get_args(kind)!r}"
    if origin is tuple:
        kinds = typing.get_args(kind)
        items = number_words(kinds[0], metadata, plural=True)
        unit = metadata.get("unit")
        if len(kinds) == 2 and kinds[1] is Ellipsis:
            count = "one or more" if metadata.get("nonempty") else "a tuple of"
        else:
            count = COUNT_WORDS.get(len(kinds), str(len(kinds)))
        return f"{count} {unit}s ({items})" if unit else f"{count} {items}"
    if kind in (int, float):
        return number_words(kind, metadata)
    words = {bool: "True or False", str: "a string", Path: "a path", type(None): "None"}
    return words.get(kind) or f"a {getattr(kind, '__name__', kind)}"


def number_words(kind: Any, metadata: Mapping[str, Any], *, plural: bool = False) -> str:
    """"an integer >= 0", "a positive integer", "numbers in [0, 1)"; another kind of item as :func:`describe_kind`
    says it."""
    if kind not in (int, float):
        return describe_kind(kind, {})
    if kind is int and bound_words(metadata) == " >= 1":
        return "positive integers" if plural else "a positive integer"
    noun = {int: ("an integer", "integers"), float: ("a number", "numbers")}[kind][plural]
    return noun + bound_words(metadata)


def bound_words(metadata: Mapping[str, Any]) -> str:
    """The bounds of ``metadata`` as " >= 0", " in [0, 1)", " > 0"..., or "" where there are none."""
    minimum, maximum, above, below = (metadata.get(key) for key in ("minimum", "maximum", "above", "below"))
    low = f"[{minimum}" if minimum is not None else f"({above}" if above is not None else None
    high = f"{maximum}]" if maximum is not None else f"{below})" if below is not None else None
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" >= {minimum}" if minimum is not None else f" > {above}"
    if high:
        return f" <= {maximum}" if maximum is not None else f" < {below}"
    return ""
