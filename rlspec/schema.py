"""Typed settings: dataclasses whose fields carry their help text, built from plain mappings.

Every config of rlspec (the training config, the ``rlspec.eval`` / ``rlspec.export`` /
``rlspec.warmup_drafter`` options) is a dataclass whose fields are declared once with
:func:`setting` -- type, default and help text. :func:`build` turns a nested mapping (composed YAML,
command-line ``key=value`` pairs) into that dataclass, converting values to the field types and
failing on the first bad key with one :class:`~rlspec.errors.ConfigError` that names it (with a
"did you mean" for a misspelled one); ``__post_init__`` then checks values across fields, as
TRL's configs do. ``Literal`` fields accept only their listed values. :func:`help_text` lists every
key with its default and help.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any, Callable, Iterator, Literal, Mapping, Union

from rlspec.errors import ConfigError

MISSING = "???"  # Hydra's marker of a value the user must give


def setting(default: Any = dataclasses.MISSING, help: str = "", *,  # noqa: A002 -- the natural name
            default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text (``metadata["help"]``)."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def choice_error(key: str, value: Any, choices: typing.Iterable[Any]) -> ConfigError:
    """The one-line error for a value outside a fixed set (with the closest valid one)."""
    options = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), options, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{key}={value!r} is not valid{hint}; choose one of: {', '.join(options)}")


def require(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("key: message")`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


# ------------------------------------------------------------------------------------ types


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if _origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]
    return False, tp


def type_name(tp: Any) -> str:
    """A short readable name of a field type (for help and errors)."""
    optional, inner = _is_optional(tp)
    if optional:
        return f"{type_name(inner)} | null"
    origin = _origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    if isinstance(value, str) and value == MISSING:
        raise ConfigError(f"{key} is required: add {key}=... to the command line")
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key} must not be null (expected {type_name(tp)})")
    if optional and inner is not str and isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
        return None  # `key=none` / `key=` on a command line (Hydra reads only `null` as None)
    tp = inner
    origin = _origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise choice_error(key, value, allowed)
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping of {type_name(tp)} keys, got {value!r}")
        return build(tp, value, key)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(v, item, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp in (int, float):
        return _number(value, tp, key)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _number(value: Any, tp: type, key: str) -> int | float:
    """An int (also from an integral float or a numeric string) or a float (also from an int)."""
    what = "an integer" if tp is int else "a number"
    if not isinstance(value, bool):
        if isinstance(value, (int, float)) and (tp is float or float(value).is_integer()):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
    raise ConfigError(f"{key} must be {what}, got {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


# ------------------------------------------------------------------------------------ build


def build(cls: type, data: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """The dataclass ``cls`` from ``data``: unknown keys, wrong types and bad values raise one
    ConfigError naming the dotted key (``prefix`` + field); missing keys take their defaults.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Opt:
    ...     lr: float = setting(1e-3, "learning rate")
    >>> build(Opt, {"lr": "5e-5"}).lr
    5e-05
    >>> build(Opt, {"lrr": 1})
    Traceback (most recent call last):
    rlspec.errors.ConfigError: unknown config key 'lrr' (did you mean 'lr'?)
    """
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise unknown_key_error(full, schema_keys(cls, f"{prefix}." if prefix else ""))
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)
    return cls(**kwargs)


def unknown_key_error(key: str, keys: Mapping[str, Any] | typing.Iterable[str], see: str = "") -> ConfigError:
    """``unknown config key 'a.b' (did you mean 'a.c'?)``, plus where to see all keys."""
    close = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}{see}")


def field_defaults(cls: type) -> dict[str, Any]:
    """``cls``'s field defaults as plain dicts, without running ``cls.__post_init__`` (sections are
    built, so each checks its own defaults)."""
    return {f.name: to_dict(default) for f in dataclasses.fields(cls)
            if (default := _field_default(f)) is not dataclasses.MISSING}


def _field_default(f: dataclasses.Field) -> Any:
    """The field's default (a fresh one from its factory), or ``dataclasses.MISSING``."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def to_dict(obj: Any) -> Any:
    """A dataclass as plain nested dicts/lists (what is saved as ``config.yaml``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------ keys and help


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    """One dotted key of a schema."""

    key: str
    type: Any
    default: Any
    help: str
    free_form: bool  # a mapping whose sub-keys are the user's (e.g. reward.terms.<name>)


def iter_keys(cls: type, prefix: str = "") -> Iterator[KeyInfo]:
    """Every dotted key of ``cls`` (nested dataclasses expanded), in declaration order."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        _, inner = _is_optional(tp)
        if dataclasses.is_dataclass(inner):
            yield from iter_keys(inner, key + ".")
            continue
        default = _field_default(f)
        if default is dataclasses.MISSING:
            default = MISSING
        free = _origin(inner) is dict or inner is Any
        yield KeyInfo(key, tp, to_dict(default), f.metadata.get("help", ""), free)


@functools.lru_cache(maxsize=None)
def schema_keys(cls: type, prefix: str = "") -> Mapping[str, KeyInfo]:
    """``{dotted key: KeyInfo}`` of every leaf key, plus every section (nested dataclass) key
    (computed once per class: shared, do not change it)."""
    keys: dict[str, KeyInfo] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        _, inner = _is_optional(hints[f.name])
        if dataclasses.is_dataclass(inner):
            key = f"{prefix}{f.name}"
            keys[key] = KeyInfo(key, inner, None, (inner.__doc__ or "").strip().split("\n")[0], False)
            keys.update(schema_keys(inner, key + "."))
    for info in iter_keys(cls, prefix):
        keys[info.key] = info
    return keys


def is_known_key(key: str, keys: Mapping[str, KeyInfo]) -> bool:
    """Whether ``key`` is a schema key or lies below a free-form mapping key."""
    if key in keys:
        return True
    parts = key.split(".")
    return any(keys.get(".".join(parts[:i])) is not None and keys[".".join(parts[:i])].free_form
               for i in range(len(parts) - 1, 0, -1))


def help_text(cls: type, title: str, prefix: str = "") -> str:
    """Every key of ``cls`` with its type, default and help, grouped by section."""
    lines = [title, ""]
    section = None
    for info in iter_keys(cls, prefix):
        head = info.key.rsplit(".", 1)[0] if "." in info.key else ""
        if head != section:
            section = head
            if head:
                lines += ["", f"{head}:"]
        default = "(required)" if info.default == MISSING else repr(info.default)
        lines.append(f"  {info.key} = {default}  [{type_name(info.type)}]")
        if info.help:
            lines.append(f"      {info.help}")
    return "\n".join(lines)
