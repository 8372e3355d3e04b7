"""Config values: the one place that checks a value against a config field's type and converts it.

Every way of setting a stage's config goes through `coerce`: a workflow file (workflows/spec.py, which adds
`@stage` references through `hook`), a `--config` TOML file (continual/config.py) and the command line
(common/cli.py, text with `from_text`). Value checks (ranges, choices) are common/validate.py's, run by each
config's `__post_init__`, so the same rules hold however the config was built; a workflow file builds every
stage's config when it is read (workflows/spec.py).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable

PASS = object()  # returned by a hook that leaves the value to `coerce`


class Mismatch(Exception):
    """The value does not fit the type; the caller words the error (it knows the file, table and key)."""


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (list, tuple, set, frozenset) or origin is typing.Sequence:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "table"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is Path:
        return "path (str)"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) < 60 else text[:57] + '...'}"


def accepts_str(tp: Any) -> bool:
    if tp in (str, Path, Any, typing.Any):
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(accepts_str(a) for a in typing.get_args(tp))
    return False


def config_fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """The init fields of a config dataclass with their resolved annotations."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def coerce(value: Any, tp: Any, *, from_text: bool = False,
           hook: Callable[[Any, Any], Any] | None = None) -> Any:
    """Check `value` against the annotation `tp` and convert it (int -> float, str -> Path); raises Mismatch.

    Values are TOML's (no int from a string); `from_text` also reads int and float from a string, as the command
    line gives them. `hook(value, tp)` sees every value first, at every level of lists and unions, and returns
    PASS or the value to use (a workflow's references)."""
    if hook is not None and (kept := hook(value, tp)) is not PASS:
        return kept
    if tp is Any or tp is typing.Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, from_text=from_text, hook=hook)
            except Mismatch:
                pass
        raise Mismatch
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise Mismatch
    if origin in (list, tuple, set, frozenset) or origin is typing.Sequence or tp in (list, tuple):
        if not isinstance(value, list):
            raise Mismatch
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = [coerce(v, args[0], from_text=from_text, hook=hook) if args else v for v in value]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise Mismatch
        args = typing.get_args(tp)
        return {k: coerce(v, args[1], from_text=from_text, hook=hook) if args else v for k, v in value.items()}
    if tp in (int, float) and from_text and isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            raise Mismatch from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise Mismatch
    if tp is Path:
        if isinstance(value, str):
            return Path(value)
        raise Mismatch
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise Mismatch
