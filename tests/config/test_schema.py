"""rlspec.schema: typed settings built from plain mappings, with one clear error per bad key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional

import pytest

from rlspec.errors import ConfigError
from rlspec.schema import MISSING, build, help_text, is_known_key, require, schema_keys, setting, to_dict


@dataclass
class Inner:
    """the inner section"""

    depth: int = setting(3, "how deep")
    mode: Literal["fast", "exact"] = setting("fast", "fast | exact")


@dataclass
class Outer:
    lr: float = setting(1e-3, "learning rate")
    steps: int = setting(10, "optimizer steps")
    name: Optional[str] = setting(None, "a name")
    limit: Optional[int] = setting(None, "first N only")
    enable: bool = setting(False, "switch")
    sizes: List[int] = setting(help="sizes", default_factory=lambda: [1, 2])
    terms: Dict[str, Any] = setting(help="free-form", default_factory=dict)
    inner: Inner = setting(help="nested", default_factory=Inner)
    path: str = setting(MISSING, "required path")

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")


def test_values_are_converted_to_the_field_types():
    out = build(Outer, {"lr": "5e-5", "steps": 4.0, "sizes": ["3", 4], "inner": {"depth": "7"}, "path": "p"})
    assert out.lr == 5e-5 and out.steps == 4 and isinstance(out.steps, int)
    assert out.sizes == [3, 4] and out.inner.depth == 7 and out.inner.mode == "fast"


@pytest.mark.parametrize("value, expected", [(True, True), ("false", False), ("yes", True), ("off", False),
                                             (1, True), (0, False), ("1", True), ("0", False)])
def test_booleans_accept_the_usual_spellings(value, expected):
    assert build(Outer, {"enable": value, "path": "p"}).enable is expected


@pytest.mark.parametrize("value", ["none", "None", "null", ""])
def test_optional_numbers_read_none_from_a_command_line(value):
    assert build(Outer, {"limit": value, "path": "p"}).limit is None
    assert build(Outer, {"name": value, "path": "p"}).name == value  # a string field keeps the string


@pytest.mark.parametrize(
    "data, message",
    [
        ({"lrr": 1}, r"unknown config key 'lrr' \(did you mean 'lr'\?\)"),
        ({"inner": {"dept": 1}}, r"unknown config key 'inner.dept' \(did you mean 'inner.depth'\?\)"),
        ({"steps": 2.5}, "steps must be an integer, got 2.5"),
        ({"steps": True}, "steps must be an integer"),
        ({"lr": "fast"}, "lr must be a number"),
        ({"enable": 2}, "enable must be true or false, got 2"),
        ({"sizes": "1,2"}, "sizes must be a list"),
        ({"inner": {"mode": "exakt"}}, r"inner.mode='exakt' is not valid \(did you mean 'exact'\?\)"),
        ({"inner": 3}, "inner must be a mapping"),
        ({"steps": None}, "steps must not be null"),
        ({"steps": 0}, "steps: must be >= 1, got 0"),
    ],
)
def test_bad_values_name_their_key(data, message):
    with pytest.raises(ConfigError, match=message):
        build(Outer, {"path": "p", **data})


def test_a_required_key_says_how_to_give_it():
    with pytest.raises(ConfigError, match=r"path is required: add path=\.\.\. to the command line"):
        build(Outer, {"path": MISSING})


def test_keys_help_and_round_trip():
    keys = schema_keys(Outer)
    assert {"lr", "inner", "inner.depth", "inner.mode", "terms"} <= set(keys)
    assert keys["inner"].help == "the inner section" and keys["inner.depth"].default == 3
    assert is_known_key("terms.anything.below", keys) and not is_known_key("inner.anything", keys)
    text = help_text(Outer, "options")
    assert "  inner.depth = 3  [int]" in text and "      how deep" in text and "path = (required)" in text
    cfg = build(Outer, {"path": "p", "inner": {"mode": "exact"}})
    assert build(Outer, to_dict(cfg)) == cfg
