"""Every number a stage or command takes has an allowed range, checked when its config is built (issue 19).

A new int/float field without a rule in its config's `__post_init__` (common/validate.py) fails here,
unless any value is valid for it (seeds).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import typing

import pytest

from common.cli import _unwrap
from common.errors import GraftError
from workflows.registry import KINDS

# Configs of commands that are not workflow stage kinds.
_COMMAND_CONFIGS = ["vocab.check:CheckConfig", "analysis.pick:PickConfig", "embed_init.config:EmbedCheckConfig",
                    "corpus.count:CountConfig", "corpus.registry:AddConfig", "corpus.registry:ListConfig"]
_ANY_VALUE = {"seed", "split_seed"}
_REQUIRED = {"spec": "1:x"}  # corpus mix: a valid mixture


def _classes() -> list[type]:
    names = sorted({k.config for k in KINDS.values()} | set(_COMMAND_CONFIGS))
    return [getattr(importlib.import_module(m), n) for m, n in (name.split(":") for name in names)]


def _required(cls: type) -> dict:
    """Placeholder values for the fields without a default."""
    hints = typing.get_type_hints(cls)
    return {f.name: _REQUIRED.get(f.name, ["x"] if _unwrap(hints[f.name])[1] else "x")
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def _numeric_fields(cls: type) -> list[tuple[str, type, bool]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, *_unwrap(hints[f.name])[:2]) for f in dataclasses.fields(cls)
            if _unwrap(hints[f.name])[0] in (int, float) and f.name not in _ANY_VALUE]


_CASES = [(cls, *spec) for cls in _classes() for spec in _numeric_fields(cls)]


def test_the_defaults_are_in_range():
    for cls in _classes():
        cls(**_required(cls))  # raises GraftError if a default breaks its own rule


@pytest.mark.parametrize("cls,name,scalar,is_list", _CASES,
                         ids=[f"{c.__module__}.{c.__name__}.{n}" for c, n, *_ in _CASES])
def test_every_number_has_a_range_checked_when_built(cls, name, scalar, is_list):
    bad = [-1] if scalar is int else [-1.0, math.nan, math.inf]
    for value in bad:
        with pytest.raises(GraftError) as e:
            cls(**{**_required(cls), name: [value] if is_list else value})
        assert f"`{name}` (--{name.replace('_', '-')}) = {value!r}" in str(e.value), str(e.value)
