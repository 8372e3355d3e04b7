"""Build argparse commands from config dataclasses (litgpt style).

The dataclass docstring becomes the command's description, and each field's
`metadata["help"]` its help line. Stage packages declare commands in their own `cli.py`:

    def register(groups: Groups) -> None:
        command(groups, "vocab train", TrainConfig, run_train, positional=("inputs",))

Supported field types: str, int, float, bool (`--x/--no-x`), Path, Optional[...] of those,
and list[...] of those (`--x a b` or `--x a --x b`; commas split too unless `metadata["split"]`
is False). A positional list field may also be given with a flag, `metadata["flag"]` (e.g. `vocab train`'s
inputs as `--corpus`, the name the other commands use for their text): both forms add up.
Text becomes a field's type through common/config.py, which also checks a workflow file's and a `--config`
TOML file's values. Keep config modules free of heavy imports so `graft --help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable

_SCALARS = (str, int, float, Path)


class Groups:
    """Hands out (and creates once) the nested subcommand groups, e.g. `vocab` in `graft vocab train`."""

    def __init__(self, top: argparse._SubParsersAction):
        self._subparsers = {(): top}

    def subparsers(self, path: tuple[str, ...]) -> argparse._SubParsersAction:
        if path not in self._subparsers:
            parent = self.subparsers(path[:-1])
            p = parent.add_parser(path[-1], help=f"{path[-1]} commands",
                                  description=f"graft {' '.join(path)} commands")
            self._subparsers[path] = p.add_subparsers(dest="_".join(path) + "_cmd", required=True,
                                                      metavar="COMMAND")
        return self._subparsers[path]


def _unwrap(tp: Any) -> tuple[Any, bool, bool]:
    """Return (scalar type, is_list, is_optional)."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def _from_text(name: str, value: str, scalar: Any) -> Any:
    from common.config import Mismatch, coerce

    try:
        return coerce(value, scalar, from_text=True)
    except Mismatch:
        raise argparse.ArgumentTypeError(
            f"--{name.replace('_', '-')}: {value!r} is not a valid {scalar.__name__}") from None


def _split(name: str, values: list[str], scalar: Any, split: bool) -> list[Any]:
    out = []
    for v in values:
        parts = [s.strip() for s in v.split(",")] if split and scalar is not Path else [v]
        out.extend(_from_text(name, s, scalar) for s in parts if s != "")
    return out


def add_config_args(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        scalar, is_list, _ = _unwrap(hints[f.name])
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        if has_default and default not in (None, [], ()) and scalar is not bool:
            help_text += f" (default: {','.join(map(str, default)) if is_list else default})"
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"help": help_text, "dest": f.name}
        if f.name in positional:
            kw.pop("dest")
            if is_list and f.metadata.get("flag"):
                parser.add_argument(f.name, nargs="*", metavar=f.name.upper(), **kw)
                parser.add_argument(f.metadata["flag"], nargs="+", action="extend", default=None, type=str,
                                    metavar=f.name.upper(), dest=_flag_dest(f.name),
                                    help=f"the same as {f.name.upper()} (both forms add up)")
            elif is_list:
                parser.add_argument(f.name, nargs="+" if not has_default else "*", metavar=f.name.upper(), **kw)
            else:
                parser.add_argument(f.name, nargs=None if not has_default else "?", type=str,
                                    metavar=f.name.upper(), **kw)
            continue
        if scalar is bool and not is_list:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kw)
        elif is_list:
            parser.add_argument(flag, nargs="+", action="extend", default=None, type=str,
                                metavar=f.metadata.get("metavar", "X"), required=not has_default, **kw)
        else:
            parser.add_argument(flag, type=str, default=None, required=not has_default,
                                metavar=f.metadata.get("metavar", scalar.__name__.upper()), **kw)


def _flag_dest(name: str) -> str:
    return f"_{name}_flag"


def _positional_and_flag(f: dataclasses.Field, ns: argparse.Namespace) -> list[str] | None:
    """A positional list field's values given either way (None when neither gave any)."""
    values = list(getattr(ns, f.name) or []) + list(getattr(ns, _flag_dest(f.name), None) or [])
    if not values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        raise argparse.ArgumentTypeError(f"no {f.name} given. Fix: pass them as {f.name.upper()}... or with "
                                         f"{f.metadata['flag']} {f.name.upper()}...")
    return values or None


def config_from_args(cls: type, ns: argparse.Namespace) -> Any:
    """Build `cls` from parsed args; values left unset keep the dataclass defaults."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False or not hasattr(ns, f.name):
            continue
        value = _positional_and_flag(f, ns) if hasattr(ns, _flag_dest(f.name)) else getattr(ns, f.name)
        if value is None:
            continue
        scalar, is_list, _ = _unwrap(hints[f.name])
        if scalar is bool and not is_list:
            kwargs[f.name] = bool(value)
        elif is_list:
            kwargs[f.name] = _split(f.name, value if isinstance(value, list) else [value], scalar,
                                    f.metadata.get("split", True))
        else:
            kwargs[f.name] = _from_text(f.name, value, scalar)
    return cls(**kwargs)


def command(groups: Groups, path: str, cls: type, run: Callable[[Any], Any], *,
            positional: tuple[str, ...] = (), help: str | None = None,
            extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
            make_config: Callable[[argparse.Namespace], Any] | None = None) -> argparse.ArgumentParser:
    """Register `graft <path>` running `run(config)`; the config is built from the parsed args.

    `extra_args`/`make_config` let a command add flags that are not config fields
    (e.g. `--config file.toml`).
    """
    words = tuple(path.split())
    doc = (cls.__doc__ or "").strip()
    parser = groups.subparsers(words[:-1]).add_parser(
        words[-1], help=help or doc.splitlines()[0] if doc else None, description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, cls, positional)
    if extra_args:
        extra_args(parser)
    build = make_config or (lambda ns: config_from_args(cls, ns))
    parser.set_defaults(_run=lambda ns: run(build(ns)))
    return parser
