"""Range and choice checks for config values, run when a config is built (command line, TOML file, workflow file).

Each config lists its numeric fields with a rule; `check_ranges` raises one GraftError naming every
value out of range, the key (and its command-line flag) and what is allowed:

    def __post_init__(self) -> None:
        check_ranges(self, {"learning_rate": ">0", "lora_dropout": "[0,1)", "block_size": ">=1"})

Rules: ">0", ">=0", ">=1", ">=2", "[0,1)", "[0,1]", "(0,1]". `None` values (optional fields left unset)
pass; NaN and infinities never do. A field that takes one of a few words is checked the same way:

        check_ranges(self, {"workers": ">=1"}, choices={"last_block": ("drop", "pad")})

Rules that tie two fields together (e.g. "auto stands alone in target_modules") follow the call in the same
`__post_init__`. Stage functions do not check values again.

Fields that must be set before a stage runs, but may be filled in after the config is built (a `--config`
TOML file plus command-line flags, a workflow's `@stage` reference), are checked by the config's
`validate()`, which the stage calls first and the workflow loader calls when it can:

    def validate(self) -> "TrainConfig":
        check_required(self, ("model", "train_data", "out"))
        return self

A workflow file builds every stage's config once when it is read (workflows/spec.py), so a bad value
there fails at load time with the table name, not hours later when the stage is reached.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from common.errors import GraftError

_RULES = {
    ">0": (lambda v: v > 0, "must be > 0", "a positive value"),
    ">=0": (lambda v: v >= 0, "must be >= 0", "0 or a positive value"),
    ">=1": (lambda v: v >= 1, "must be >= 1", "1 or more"),
    ">=2": (lambda v: v >= 2, "must be >= 2", "2 or more"),
    "[0,1)": (lambda v: 0 <= v < 1, "must be in [0, 1)", "a value from 0 up to, not including, 1"),
    "[0,1]": (lambda v: 0 <= v <= 1, "must be in [0, 1]", "a value from 0 to 1"),
    "(0,1]": (lambda v: 0 < v <= 1, "must be in (0, 1]", "a value above 0, at most 1"),
}


def _finite(v: int | float) -> bool:
    return isinstance(v, int) or math.isfinite(v)  # NaN, inf, -inf (TOML writes them nan, inf)


class SettingsError(GraftError):
    """Problems with named settings: `problems` holds (key, message) pairs, so a caller that knows a key's value
    is not final yet (a workflow's pending `@stage#key`) can drop that key's problems (workflows/spec.py)."""

    def __init__(self, problems: list[tuple[str, str]], title: str):
        self.problems, self.title = problems, title
        texts = [text for _, text in problems]
        super().__init__(texts[0] if len(texts) == 1 else f"{title}:\n  " + "\n  ".join(texts))

    def without(self, keys: set[str]) -> "SettingsError | None":
        kept = [(k, text) for k, text in self.problems if k not in keys]
        return SettingsError(kept, self.title) if kept else None


def range_problems(cfg: Any, rules: Mapping[str, str]) -> list[tuple[str, str]]:
    problems = []
    for key, rule in rules.items():
        value = getattr(cfg, key)
        if value is None or isinstance(value, bool):
            continue
        ok, what, fix = _RULES[rule]
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if isinstance(v, (int, float)) and not (_finite(v) and ok(v))]
        if bad:
            why = what if _finite(bad[0]) else "is not a finite number"
            problems.append((key, f"`{key}` (--{key.replace('_', '-')}) = {bad[0]!r} {why}. Fix: set {key} to {fix}"))
    return problems


def choice_problems(cfg: Any, choices: Mapping[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    problems = []
    for key, allowed in choices.items():
        value = getattr(cfg, key)
        if value is not None and value not in allowed:
            words = ", ".join(allowed)
            problems.append((key, f"`{key}` (--{key.replace('_', '-')}) = {value!r} is not one of {words}. Fix: set "
                                  f"{key} to one of {words}"))
    return problems


def _raise(problems: list[tuple[str, str]], title: str) -> None:
    if problems:
        raise SettingsError(problems, title)


def check_required(cfg: Any, names: tuple[str, ...] | Mapping[str, str],
                   how: str = "pass --{flag} or set {key} in the config") -> None:
    """Raise GraftError naming every field of `names` that is unset (None or empty); `how` says how to set one,
    with {flag} and {key} filled in (`names` may map each field to its own `how`)."""
    hows = dict(names) if isinstance(names, Mapping) else dict.fromkeys(names, how)
    missing = [n for n in hows if getattr(cfg, n) in (None, "", [], ())]
    _raise([(n, f"`{n}` is not set. Fix: " + hows[n].format(flag=n.replace("_", "-"), key=n)) for n in missing],
           "settings not set")


def check_ranges(cfg: Any, rules: Mapping[str, str], choices: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """Raise GraftError naming every key of `cfg` whose value breaks its rule or is not among its `choices`
    (see the module docstring)."""
    _raise(range_problems(cfg, rules) + choice_problems(cfg, choices or {}), "out-of-range settings")
