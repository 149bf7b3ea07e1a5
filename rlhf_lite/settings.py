"""Config dataclasses as data: their field docs, typed overrides, and the checks every config shares.

Every stage has one frozen dataclass of settings (``SFTConfig``, ``RMConfig``, ``PPOConfig``, ...), each field
documented by the string literal under it. This module reads those docstrings (for ``--help``), applies
``field=value`` overrides with type checks (``--set`` and the generated flags of the CLI), and checks what
every config needs in one place: each ``Literal`` field holds one of its choices, and no float is NaN or
infinite.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import json
import math
import textwrap
import types
import typing
import warnings
from typing import Any, Literal


class SettingError(ValueError):
    """A setting that cannot be used; the message names the field."""


class SettingWarning(UserWarning):
    """A setting that works but likely not as meant (a detector that cannot fire in so short a run, a warm-up
    longer than the training); the message names the field."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (and of its dataclass bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields."""
    return typing.get_type_hints(cls)


def describe_type(hint: Any) -> str:
    """A short name of a field's type for ``--help``: ``float | None``, ``{'rollout', 'reference'}``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "{" + ", ".join(repr(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else describe_type(a) for a in args)
    if origin is tuple:
        return "tuple"
    return getattr(hint, "__name__", str(hint))


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` (a parsed Python literal) as type ``hint``: ints widen to float, lists become tuples, a
    Literal takes one of its choices; anything else raises SettingError naming ``where``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value in args:
            return value
        raise SettingError(f"{where}: expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arm, where)
            except SettingError:
                pass
    elif origin is tuple and isinstance(value, (list, tuple)):
        arms = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(arms) == len(value):
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, arms)))
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise SettingError(f"{where}: expected {describe_type(hint)}, got {type(value).__name__} {value!r}")


def parse_value(raw: str) -> Any:
    """A command-line value: a Python literal (``1e-4``, ``None``, ``(0.9, 0.95)``), else the bare string."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def replace_fields(cfg: Any, changes: dict[str, Any], where: str = "") -> Any:
    """``dataclasses.replace(cfg, **changes)`` with every value checked against its field's type; a nested
    dataclass takes a dict of its own changes, or dotted names (``collapse.patience``)."""
    hints = type_hints(type(cfg))
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for name, value in changes.items():
        head, _, rest = name.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[name] = value
    label = where or type(cfg).__name__
    unknown = sorted((set(flat) | set(nested)) - set(hints))
    if unknown:
        raise SettingError(f"{label} has no field {unknown[0]!r}; its fields: {', '.join(sorted(hints))}")

    def convert(name: str, value: Any) -> Any:
        at = f"{label}.{name}"
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            return replace_fields(current, value, at)
        return coerce(value, hints[name], at)

    out = {k: convert(k, v) for k, v in flat.items()}
    for head, sub in nested.items():
        current = out.get(head, getattr(cfg, head))
        if not dataclasses.is_dataclass(current):
            raise SettingError(f"{label}.{head} is not a group of settings: cannot set {head}.{next(iter(sub))}")
        out[head] = replace_fields(current, sub, f"{label}.{head}")
    return dataclasses.replace(cfg, **out)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["name=value", ...]`` (the ``--set`` flag) as a dict of parsed values."""
    changes: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SettingError(f"--set expects name=value, got {item!r}")
        name, raw = item.split("=", 1)
        changes[name.strip().replace("-", "_")] = parse_value(raw)
    return changes


def check_common(cfg: Any, where: str | None = None) -> None:
    """The checks every config shares: each Literal field holds one of its choices, every float is finite,
    and nested configs pass the same checks. Raises SettingError naming the field."""
    label = where or type(cfg).__name__
    hints = type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        at = f"{label}.{f.name}"
        if dataclasses.is_dataclass(value):
            check_common(value, at)
            continue
        if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
            raise SettingError(f"{at} must be one of {', '.join(repr(a) for a in typing.get_args(hint))}, "
                               f"got {value!r}")
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise SettingError(f"{at} must be a finite number, got {value!r}")


def require(cfg: Any, condition: bool, name: str, message: str) -> None:
    """Raise SettingError ``"{Config}.{name} {message}, got {value}"`` unless ``condition``."""
    if not condition:
        value = getattr(cfg, name, None)
        raise SettingError(f"{type(cfg).__name__}.{name} {message}, got {value!r}")


def positive(cfg: Any, *names: str) -> None:
    """Every named field is > 0."""
    for name in names:
        require(cfg, getattr(cfg, name) > 0, name, "must be positive")


def fits_data(cfg: Any, name: str, rows: dict[str, int] | None, file: str, what: str = "rows") -> None:
    """Field ``name`` (a count per batch or per evaluation) must not exceed the ``rows`` of data ``file``
    (skipped when the sizes are not known yet)."""
    if rows is not None and file in rows:
        require(cfg, getattr(cfg, name) <= rows[file], name, f"exceeds the {rows[file]} {what} of {file}")


def warn_setting(cfg: Any, condition: bool, name: str, message: str) -> None:
    """A :class:`SettingWarning` ``"{Config}.{name} ({value}) {message}"`` when ``condition`` holds."""
    if condition:
        value = getattr(cfg, name, None)
        warnings.warn(f"{type(cfg).__name__}.{name} ({value!r}) {message}", SettingWarning, stacklevel=3)


def revalidate(cfg: Any, *args: Any, **kwargs: Any) -> None:
    """``cfg.validate(*args, **kwargs)`` once more (now against the data's size) without repeating the
    :class:`SettingWarning` of the first check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SettingWarning)
        cfg.validate(*args, **kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON data (tuples become lists), as summaries and checkpoints store it."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Inverse of :func:`to_dict` (nested dataclasses and tuples restored)."""
    hints = type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value)
        else:
            value = coerce(value, hint, f"{cls.__name__}.{f.name}")
        kwargs[f.name] = value
    return cls(**kwargs)


__all__ = ["SettingError", "SettingWarning", "check_common", "coerce", "describe_type", "field_docs", "fits_data",
           "from_dict", "parse_overrides", "parse_value", "positive", "replace_fields", "require", "revalidate", "to_dict",
           "type_hints", "warn_setting"]
