"""The command-line style every rlspec tool shares: ``key=value`` overrides in Hydra's syntax
(dotted keys, ``[a,b]`` lists, ``null``), checked against the tool's typed options dataclass.

``python -m rlspec.train`` composes them with Hydra; ``rlspec.eval``, ``rlspec.export``,
``rlspec.merging`` and ``rlspec.warmup_drafter`` parse them with :func:`parse_options`. Every tool
answers ``--help`` with each key, its default and help text, and ends with one line
``rlspec: error: ...`` (exit code 2) on bad input (:func:`run_main`).
"""

from __future__ import annotations

import re
import sys
from typing import Any, Callable, NoReturn, Sequence, TypeVar

from rlspec.errors import ConfigError, RLSpecError
from rlspec.schema import build, help_text, is_known_key, schema_keys, unknown_key_error

T = TypeVar("T")


def parse_key_values(argv: Sequence[str], usage: str) -> dict[str, Any]:
    """``["a.b=1", "c=[x,y]"]`` -> ``{"a.b": 1, "c": ["x", "y"]}`` (values typed as Hydra types them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out: dict[str, Any] = {}
    parser = OverridesParser.create()
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not key=value; usage: {usage}")
        try:
            (override,) = parser.parse_overrides([arg.lstrip("+")])
        except Exception as err:  # noqa: BLE001 -- the grammar's own message, on one line
            raise ConfigError(f"cannot parse {arg!r}: {str(err).splitlines()[0]}") from None
        out[override.key_or_group] = override.value()
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys -> nested mappings."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key} conflicts with {part}={child!r}: give one or the other")
            node = child
        node[leaf] = value
    return out


def parse_options(cls: type[T], argv: Sequence[str], *, tool: str, usage: str,
                  aliases: Sequence[tuple[str, str]] = ()) -> T:
    """The options ``cls`` from ``key=value`` arguments of ``python -m {tool}``.

    ``aliases`` rewrite keys first (``(regex, replacement)``), for spellings a tool keeps for its
    users (``eval.benchmarks.NAME.path`` -> ``eval.paths.NAME``).
    """
    flat = parse_key_values(argv, usage)
    keys = schema_keys(cls)
    renamed: dict[str, Any] = {}
    for key, value in flat.items():
        for pattern, replacement in aliases:
            key = re.sub(f"^{pattern}$", replacement, key)
        if not is_known_key(key, keys):
            raise unknown_key_error(key, keys, see=f". See all keys with: python -m {tool} --help")
        renamed[key] = value
    return build(cls, nest(renamed))


def asks_help(args: Sequence[str]) -> bool:
    return "--help" in args or "-h" in args


def exit_with_error(err: BaseException) -> NoReturn:
    """End a tool on bad user input: one line, exit code 2."""
    print(f"rlspec: error: {err}", file=sys.stderr)
    sys.exit(2)


def run_main(body: Callable[[list[str]], None], argv: Sequence[str] | None, cls: type, *, tool: str,
             usage: str) -> None:
    """Run ``body(argv)``; ``--help`` prints the keys of ``cls``; a user error is one line, exit 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if asks_help(args):
        print(f"usage: {usage}\n")
        print(help_text(cls, f"python -m {tool} options (key = default  [type])"))
        return
    try:
        body(args)
    except (RLSpecError, ValueError) as err:
        exit_with_error(err)
