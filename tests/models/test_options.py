"""The options checker: every model family refuses an option of the wrong type or out of range in one line that
names it, says what was wrong and what is accepted, whether it comes from Python or from ``--set``; valid values,
lists for tuples and ints for floats among them, still build."""

from __future__ import annotations

import dataclasses
import importlib
import typing

import pytest

import xception
from xception.cli import parse_options
from xception.errors import InvalidArgumentError, UnknownOptionError
from xception.layers import MID_OPERATIONS, ORDERS, MidOperation, Order
from xception.models import backbone
from xception.models.deeplab import HeadOptions
from xception.models.inception import InceptionOptions
from xception.models.options import NetworkOptions, check_options, declared
from xception.models.registry import OPTION_DECLARATIONS, option_problem
from xception.models.xception import NUMERICS, Numerics, XceptionConfig

# For each family, an option of the wrong type and one out of range, with the line each must raise.
REFUSED = [
    ("xception", {"middle_repeats": "abc"}, "middle_repeats must be an integer >= 0, got 'abc'"),
    ("xception", {"middle_repeats": -1}, "middle_repeats must be >= 0, got -1"),
    ("xception", {"stem_widths": (16, "32")}, "stem_widths must be two widths (positive integers), got (16, '32')"),
    ("xception", {"fc_layers": [64, 0]}, "fc_layers must be positive integers, got [64, 0]"),
    ("xception", {"bn_momentum": "fast"}, "bn_momentum must be a number in (0, 1] or None, got 'fast'"),
    ("xception", {"stem_padding": 1}, "stem_padding must be one of ('valid', 'same'), got 1"),
    ("xception41", {"drop_rate": "abc"}, "drop_rate must be a number in [0, 1), got 'abc'"),
    ("xception65p", {"drop_path_rate": 1.5}, "drop_path_rate must be in [0, 1), got 1.5"),
    ("xception71", {"in_chans": 0}, "in_chans must be >= 1, got 0"),
    ("inception_v3_compact", {"width": "wide"}, "width must be a number > 0, got 'wide'"),
    ("inception_v3_compact", {"blocks": (1, 0, 1)}, "blocks must be positive integers, got (1, 0, 1)"),
    ("inception_v3_compact", {"blocks": (1, 2)}, "blocks must be three counts (positive integers), got (1, 2)"),
    ("inception_v3_compact", {"bn_momentum": None}, "bn_momentum must be a number in (0, 1], got None"),
    ("deeplabv3plus_xception", {"aspp_channels": "256"}, "aspp_channels must be a positive integer, got '256'"),
    ("deeplabv3plus_xception", {"input_scale": 1.5}, "input_scale must be in (0, 1], got 1.5"),
    ("deeplabv3_xception41", {"atrous_rates": 6}, "atrous_rates must be one or more rates (positive integers) or "
                                                  "None, got 6"),
    ("deeplabv3_xception41", {"separable": "yes"}, "separable must be True or False, got 'yes'"),
    ("deeplabv3plus_xception", {"middle_repeats": "abc"}, "middle_repeats must be an integer >= 0, got 'abc'"),
]


@pytest.mark.parametrize(("name", "options", "message"), REFUSED)
def test_each_family_refuses_a_wrong_type_and_a_wrong_range_in_one_line(name: str, options: dict,
                                                                         message: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        xception.create_model(name, device="meta", **options)
    assert str(info.value) == message


@pytest.mark.parametrize(("option", "value"), [("middle_repeats", True), ("stem_stride", True),
                                               ("output_stride", 16.0), ("stem_widths", (16, False)),
                                               ("num_classes", 10.0)])
def test_bool_is_not_an_int_nor_a_float_an_int(option: str, value: object) -> None:
    """True == 1 and 16.0 == 16 in Python, but neither is what the option takes."""
    with pytest.raises(InvalidArgumentError, match=rf"^{option} must be "):
        xception.create_model("xception", device="meta", **{option: value})


def test_valid_values_build_normalised() -> None:
    """Lists for tuples (a command line user writes [16, 32] as often as (16, 32)), ints for floats."""
    model = xception.create_model("xception", device="meta", stem_widths=[16, 32], entry_widths=[32, 64],
                                  fc_layers=[64], bn_momentum=1, drop_rate=0, multi_grid=[1, 2], output_stride=16)
    assert model.config.stem_widths == (16, 32) and model.config.entry_widths == (32, 64)
    assert model.config.fc_layers == (64,) and model.config.bn_momentum == 1.0
    assert isinstance(model.config.bn_momentum, float)
    segmentation = xception.create_model("deeplabv3plus_xception41", device="meta", atrous_rates=[3, 6, 9],
                                         input_scale=1, drop_rate=0)
    assert segmentation.aspp.rates == (3, 6, 9) and segmentation.input_scale == 1.0
    baseline = xception.create_model("inception_v3_compact", device="meta", blocks=[1, 1, 1], width=1,
                                     stem_width=None)
    assert baseline.architecture()["blocks"] == [1, 1, 1] and baseline.architecture()["width"] == 1.0


def test_the_config_checks_itself() -> None:
    """XceptionConfig refuses a wrong knob when built directly, not only through create_model."""
    with pytest.raises(InvalidArgumentError, match=r"^segments must be a positive integer or None, got '2'$"):
        XceptionConfig(segments="2")
    with pytest.raises(InvalidArgumentError, match=r"^entry_widths needs at least one width, got \[\]$"):
        XceptionConfig(entry_widths=[])
    assert XceptionConfig(tail_widths=[1536, 2048]) == XceptionConfig()


def test_unknown_options_are_still_unknown() -> None:
    with pytest.raises(UnknownOptionError, match=r"unknown xception41 option\(s\) \['middle_repeats'\]"):
        xception.create_model("xception41", middle_repeats=4)
    with pytest.raises(UnknownOptionError, match=r"unknown Xception option\(s\) \['middle_repeat'\]"):
        check_options(XceptionConfig, {"middle_repeat": 4}, owner="Xception")


def test_the_defaults_pass_their_own_declarations() -> None:
    """Every declared field has a type the checker reads and a default inside its own range."""
    for declaration in OPTION_DECLARATIONS:
        module, name = declaration.split(":")
        spec = getattr(importlib.import_module(f"xception.models.{module}"), name)
        defaults = {item.name: item.default for item in dataclasses.fields(spec)}
        assert check_options(spec, defaults, owner=name) == defaults, name


def test_the_choices_are_the_layers_own() -> None:
    """The Literal types the checker reads name the same choices as the tuples the layers use."""
    assert typing.get_args(MidOperation) == MID_OPERATIONS
    assert typing.get_args(Order) == ORDERS
    assert typing.get_args(Numerics) == tuple(NUMERICS)
    assert typing.get_args(declared(NetworkOptions)["global_pool"][0]) == backbone.GLOBAL_POOLS
    assert typing.get_args(declared(NetworkOptions)["output_stride"][0]) == backbone.OUTPUT_STRIDES


def test_option_problem_refuses_only_what_every_model_refuses() -> None:
    assert option_problem("middle_repeats", "abc") == "must be an integer >= 0, got 'abc'"
    assert option_problem("middle_repeats", 4) is None
    assert option_problem("bn_momentum", None) is None  # the Xception family's default, though not the baseline's
    assert option_problem("num_classes", 0) is None  # pooled features for classification, refused by DeepLab
    assert option_problem("no_such_option", "abc") is None  # left to the model, which lists its own options
    assert option_problem("width", 0) == "must be > 0, got 0"
    assert {"width", "aspp_channels", "middle_repeats", "drop_rate"} <= {
        item.name for spec in (NetworkOptions, XceptionConfig, InceptionOptions, HeadOptions)
        for item in dataclasses.fields(spec)}


def test_parse_options_names_set() -> None:
    assert parse_options(["middle_repeats=4", "stem_widths=[16, 32]", "mid_activation=relu", "segments=None",
                          "global_pool="]) == {"middle_repeats": 4, "stem_widths": [16, 32],
                                               "mid_activation": "relu", "segments": None, "global_pool": ""}
    with pytest.raises(InvalidArgumentError, match=r"^middle_repeats \(--set\) must be an integer >= 0, got 'abc'$"):
        parse_options(["middle_repeats=abc"])
    with pytest.raises(InvalidArgumentError, match=r"^fc_layers \(--set\) must be a tuple of widths"):
        parse_options(["fc_layers={[1]: 2}"])  # literal_eval's TypeError: the text itself, refused
    with pytest.raises(InvalidArgumentError, match=r"--set takes KEY=VALUE"):
        parse_options(["middle_repeats"])
