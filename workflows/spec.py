"""Read and validate a workflow TOML file.

Format (see docs/workflows.md):

    [workflow]
    name = "demo"              # default: the file name without .toml
    runs = "runs"              # stage outputs default to {runs}/{name}/{stage}

    [vocab_train]              # one table per stage; the table name is the stage name
    kind = "vocab.train"       # default: the table name with '_' -> '.' when that is a known kind
    inputs = ["@corpora/zh_news.jsonl"]   # '@stage' = that stage's output folder, '@stage/a/b' a path in it
    chars = [2000, 3000]

    [vocab_merge]
    base = "@base_model"
    add = "@vocab_score#pick.path"         # '@stage#a.b' = a value from that stage's manifest.json
    # out = "somewhere/else"               # optional; the stage's output folder

Every other key is a field of the stage's config dataclass: unknown keys, wrong types and
missing required keys are errors that name the file, the stage table and the key.
Relative paths are relative to the current directory. `@@text` is the literal string `@text`.
References are parsed and resolved in workflows/refs.py; values are checked against their fields' types by
common/config.py (as the command line's and a `--config` TOML file's are), and each stage's config is built
once here, so its own range and choice checks (common/validate.py) fail when the file is read.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import PASS, accepts_str, config_fields, type_name
from common.config import Mismatch as _Mismatch
from common.config import coerce as coerce_value
from common.config import describe as _describe
from common.errors import GraftError, input_error
from common.validate import SettingsError
from workflows.refs import _Placeholders, _unescape, parse_ref, refs_in, resolve_value
from workflows.registry import KINDS, StageKind, resolve_kind

RESERVED = ("kind", "after", "launch")
_STAGE_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class Stage:
    name: str
    kind: StageKind
    values: dict[str, Any]  # as written in the TOML (references still as strings)
    out: Path
    deps: list[str] = field(default_factory=list)  # earlier stages this one reads, in file order
    index: int = 0
    launch: Any = None  # workflows.launch.LaunchSpec

    @property
    def config_class(self) -> type:
        return self.kind.config_class()


@dataclass
class Workflow:
    path: Path
    name: str
    runs: Path
    stages: list[Stage]
    description: str = ""
    slurm: Any = None  # workflows.slurm.SlurmSpec: the [slurm] table, for `graft run --executor slurm`

    @property
    def home(self) -> Path:
        """Folder for the workflow's state file and lock."""
        return self.runs / self.name

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise GraftError(f"{self.path}: no stage named {name!r}. Fix: use one of "
                         f"{', '.join(s.name for s in self.stages)}")

    def downstream(self, name: str) -> set[str]:
        """`name` and every stage that reads it, directly or not."""
        out = {name}
        for s in self.stages:
            if any(d in out for d in s.deps):
                out.add(s.name)
        return out


# ---------------------------------------------------------------- types

def _workflow_strings(allow_refs: bool):
    """The workflow's part of `coerce`: while validating (`allow_refs`) an '@stage...' string is accepted where a
    string or path is expected and an '@stage#key' string anywhere (checked again once resolved), and strings
    stay as written; when the config is built, '@@' escapes are undone."""
    def hook(value: Any, tp: Any) -> Any:
        if allow_refs and (ref := parse_ref(value)) is not None:
            if ref.key is not None or accepts_str(tp):
                return value
            raise _Mismatch
        if isinstance(value, str) and tp in (str, Path):
            return value if allow_refs else (Path if tp is Path else str)(_unescape(value))
        return PASS
    return hook


def coerce(value: Any, tp: Any, allow_refs: bool = False) -> Any:
    """Check `value` (from TOML) against the annotation `tp` and convert it (common.config.coerce, with the
    workflow's references and '@@' escapes). Raises common.config.Mismatch."""
    return coerce_value(value, tp, hook=_workflow_strings(allow_refs))


# ---------------------------------------------------------------- loading

def load_workflow(path: str | Path, runs: str | Path | None = None) -> Workflow:
    """Parse and validate `path`; every problem found is reported at once."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except FileNotFoundError:
        raise input_error(path, "workflow file not found", "check the path (bundled examples are in workflows/)") from None
    except tomllib.TOMLDecodeError as e:
        raise input_error(path, f"invalid TOML: {e}", "fix the syntax at that line") from None
    except UnicodeDecodeError:
        raise input_error(path, "not UTF-8 text", "save the workflow as UTF-8") from None
    try:
        return build_workflow(raw, path, runs)
    except GraftError as e:
        raise GraftError(_with_lines(str(e), text)) from None


_PROBLEM = re.compile(r"^  \[(?P<table>[^\]]+)\] ")
_KEY = re.compile(r"`(\w+)`|key '(\w+)'")


def _with_lines(message: str, text: str) -> str:
    """`message` with "line N: " before each problem whose [table] and key are found in the file's `text`."""
    lines = text.splitlines()
    table = None
    out = []
    for row in message.split("\n"):
        if m := _PROBLEM.match(row):
            table = m.group("table")
        key = _KEY.search(row) if table and row.startswith("  ") else None
        n = _line_of(lines, table, key.group(1) or key.group(2)) if key else None
        indent = len(row) - len(row.lstrip(" "))
        out.append(f"{row[:indent]}line {n}: {row[indent:]}" if n else row)
    return "\n".join(out)


def _line_of(lines: list[str], table: str, key: str) -> int | None:
    """1-based line of `key = ...` inside the TOML table `[table]` (None when not written there)."""
    current = None
    for i, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            current = stripped.strip("[]").split("]")[0].strip()
        elif current == table and re.match(rf"{re.escape(key)}\s*=", stripped):
            return i
    return None


def build_workflow(raw: dict[str, Any], path: Path, runs: str | Path | None = None) -> Workflow:
    """The workflow of a parsed TOML file; every problem of every table is collected, then raised at once."""
    errors: list[str] = []
    name, runs_dir, description = _workflow_head(raw, path, errors)
    runs_path = Path(runs) if runs is not None else Path(runs_dir)
    stages: list[Stage] = []
    seen: dict[str, Stage] = {}
    for sname, table in raw.items():
        if sname in ("workflow", "slurm"):
            continue
        stage = _build_stage(sname, table, raw, runs_path / name, seen, len(stages), errors)
        if stage is not None:
            stages.append(stage)
            seen[sname] = stage
    _check_distinct_outputs(stages, errors)
    slurm = _slurm_spec(raw.get("slurm", {}), stages, errors)
    if not stages and not errors:
        errors.append("no stage tables. Fix: add one table per stage, e.g. [vocab_train] with kind = \"vocab.train\"")
    if errors:
        raise GraftError(f"{path}: invalid workflow:\n  " + "\n  ".join(errors))
    return Workflow(path, name, runs_path, stages, description, slurm)


def _workflow_head(raw: dict[str, Any], path: Path, errors: list[str]) -> tuple[str, str, str]:
    """name, runs folder and description of the [workflow] table."""
    head = raw.get("workflow", {})
    if not isinstance(head, dict):
        raise input_error(path, "'workflow' must be a table ([workflow])", "write [workflow] name = \"...\"")
    for k in head:
        if k not in ("name", "runs", "description"):
            errors.append(f"[workflow] unknown key {k!r}{_suggest(k, ['name', 'runs', 'description'])}")
    name = head.get("name", path.stem)
    if not isinstance(name, str) or not _STAGE_NAME.match(name):
        errors.append(f"[workflow] key 'name': expected a name of letters, digits, '_' or '-', got {_describe(name)}")
        name = path.stem
    runs_dir = head.get("runs", "runs")
    if not isinstance(runs_dir, str):
        errors.append(f"[workflow] key 'runs': expected str, got {_describe(runs_dir)}")
        runs_dir = "runs"
    return name, runs_dir, head.get("description", "")


def _build_stage(sname: str, table: Any, raw: dict[str, Any], home: Path, seen: dict[str, Stage], index: int,
                 errors: list[str]) -> Stage | None:
    """One stage table as a Stage (None, with its problems in `errors`, when it cannot be built)."""
    where = f"[{sname}]"
    kind = _stage_kind(sname, table, where, errors)
    if kind is None:
        return None
    try:
        fields = config_fields(kind.config_class())
    except GraftError as e:
        errors.append(str(e))
        return None
    values = _stage_values(kind, fields, table, where, errors)
    if kind.out_field not in fields:
        errors.append(f"{where} kind {kind.name!r} has no output field {kind.out_field!r}")
        return None
    out_value = table.get(kind.out_field)
    if parse_ref(out_value) is not None:
        errors.append(f"{where} key {kind.out_field!r}: the output folder cannot be a reference")
        return None
    out = Path(_unescape(out_value)) if isinstance(out_value, str) else home / sname
    launch = _launch_spec(table.get("launch", {}), kind.name, where, errors)
    deps = _stage_deps(table, values, raw, seen, where, errors)
    _check_values(kind, fields, values, where, errors)
    return Stage(sname, kind, values, out, sorted(deps, key=lambda d: seen[d].index), index, launch)


def _stage_kind(sname: str, table: Any, where: str, errors: list[str]) -> StageKind | None:
    """The stage's kind: its `kind` key, or a table name that is a kind (e.g. [vocab_train])."""
    if not isinstance(table, dict):
        errors.append(f"top-level key {sname!r} is not a stage table. Fix: put settings inside a "
                      f"[stage] table (or [workflow])")
        return None
    if not _STAGE_NAME.match(sname):
        errors.append(f"{where} stage names may only use letters, digits, '_' and '-'")
        return None
    kind_name = table.get("kind")
    if kind_name is None:
        kind_name = next((g for g in (sname, sname.replace("_", ".", 1)) if g in KINDS), None)
    if kind_name is None:
        if table and all(isinstance(v, dict) for v in table.values()):
            sub = next(iter(table))
            errors.append(f"[{sname}.{sub}]: a dotted table name makes nested tables. Fix: name the "
                          f"stage [{sname}_{sub}] (references may still say @{sname}.{sub})")
        else:
            errors.append(f"{where} missing key 'kind'. Fix: add kind = \"...\" (one of {', '.join(KINDS)})")
        return None
    if not isinstance(kind_name, str):
        errors.append(f"{where} key 'kind': expected str, got {_describe(kind_name)}")
        return None
    try:
        return resolve_kind(kind_name, where)
    except GraftError as e:
        errors.append(str(e))
        return None


def _stage_values(kind: StageKind, fields: dict, table: dict[str, Any], where: str,
                  errors: list[str]) -> dict[str, Any]:
    """The table's settings checked against the config's fields and types (references kept as written)."""
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in RESERVED:
            continue
        if key not in fields:
            valid = sorted(fields) + list(RESERVED)
            errors.append(f"{where} unknown key {key!r} for kind {kind.name!r}{_suggest(key, valid)}. "
                          f"Valid keys: {', '.join(valid)}")
            continue
        tp = fields[key][1]
        try:
            values[key] = coerce(value, tp, allow_refs=True)
        except _Mismatch:
            errors.append(f"{where} key {key!r}: expected {type_name(tp)}, got {_describe(value)}")
    for key, (f, tp) in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and key not in table and key != kind.out_field:
            help_ = f.metadata.get("help", "")
            errors.append(f"{where} missing required key {key!r}" + (f" ({help_})" if help_ else ""))
    return values


def _stage_deps(table: dict[str, Any], values: dict[str, Any], raw: dict[str, Any], seen: dict[str, Stage],
                where: str, errors: list[str]) -> list[str]:
    """The earlier stages this one needs: its `after` list and every stage its values refer to."""
    deps: list[str] = []
    after = table.get("after", [])
    if not (isinstance(after, list) and all(isinstance(a, str) for a in after)):
        errors.append(f"{where} key 'after': expected list of stage names, got {_describe(after)}")
        after = []
    for target in after + refs_in(values):
        ref_stage = target if not target.startswith("@") else parse_ref(target).stage
        resolved = _find_stage(ref_stage, seen)
        if resolved is None:
            later = ref_stage in raw or ref_stage.replace(".", "_") in raw
            errors.append(f"{where} {target!r} names {'a later' if later else 'no'} stage. Fix: refer "
                          "to a stage defined above this one" +
                          (f" ({', '.join(seen)})" if seen else ""))
        elif resolved not in deps:
            deps.append(resolved)
    return deps


def _check_distinct_outputs(stages: list[Stage], errors: list[str]) -> None:
    outs: dict[Path, str] = {}
    for s in stages:
        key = s.out.resolve()
        if key in outs:
            errors.append(f"[{s.name}] output folder {s.out} is also the output of [{outs[key]}]. Fix: give each "
                          "stage its own out")
        outs[key] = s.name


def _slurm_spec(table: Any, stages: list[Stage], errors: list[str]) -> Any:
    """The [slurm] table, and every stage's resources checked now rather than at submission."""
    from workflows.slurm import check_resources, parse_slurm_table, stage_resources

    spec = parse_slurm_table(table, [s.name for s in stages], errors)
    for s in stages:
        errors.extend(check_resources(s, stage_resources(s, spec)))
    return spec


def _check_values(kind: StageKind, fields: dict, values: dict[str, Any], where: str, errors: list[str]) -> None:
    """Build the config once with placeholder paths, so that its own checks (__post_init__,
    validate()) report bad values now rather than when the stage is reached hours later."""
    kwargs: dict[str, Any] = {}
    pending = set()
    for key, value in values.items():
        if any(parse_ref(r) is not None and parse_ref(r).key for r in refs_in(value)):
            pending.add(key)  # a manifest value: unknown until the stage it names has run
            continue
        placeholder = resolve_value(value, _Placeholders(), lambda name: {})
        try:
            kwargs[key] = coerce(placeholder, fields[key][1])
        except _Mismatch:
            return
    if kind.out_field in fields:
        kwargs[kind.out_field] = kwargs.get(kind.out_field, "out")
    try:
        cfg = kind.config_class()(**kwargs)
        if callable(getattr(cfg, "validate", None)):
            cfg.validate()
    except SettingsError as e:  # less the problems of pending manifest values (a required one looks unset)
        if (kept := e.without(pending)) is not None:
            errors.append(f"{where} " + str(kept).replace("\n", "\n  "))  # a list of problems: indented
    except GraftError as e:
        errors.append(f"{where} " + str(e).replace("\n", "\n  "))
    except (TypeError, ValueError):
        pass  # e.g. a required field given as a manifest reference; checked when the stage runs


def coerce_table(cls: type, table: dict[str, Any], where: str, errors: list[str]) -> dict[str, Any]:
    """The keys of a settings table checked against the dataclass `cls`; problems go to `errors`."""
    fields = config_fields(cls)
    values = {}
    for key, value in table.items():
        if key not in fields:
            errors.append(f"{where} unknown key {key!r}{_suggest(key, list(fields))}. Valid keys: "
                          f"{', '.join(fields)}")
            continue
        try:
            values[key] = coerce(value, fields[key][1])
        except _Mismatch:
            errors.append(f"{where} key {key!r}: expected {type_name(fields[key][1])}, got {_describe(value)}")
    return values


def _launch_spec(table: Any, kind: str, where: str, errors: list[str]) -> Any:
    from workflows.launch import LaunchSpec, check_launch

    if not isinstance(table, dict):
        errors.append(f"{where} key 'launch': expected a table ([{where[1:-1]}.launch]), got {_describe(table)}")
        return LaunchSpec()
    spec = LaunchSpec(**coerce_table(LaunchSpec, table, f"{where} launch:", errors))
    try:
        check_launch(kind, spec)
    except GraftError as e:
        errors.append(f"{where} launch: {e}")
    return spec


def _find_stage(name: str, seen: dict[str, Stage]) -> str | None:
    for candidate in (name, name.replace(".", "_")):
        if candidate in seen:
            return candidate
    return None


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------- resolution

def build_config(stage: Stage, outputs: dict[str, Path], manifest_of) -> Any:
    """The stage's config dataclass with references resolved and the output folder set."""
    fields = config_fields(stage.config_class)
    kwargs = {}
    for key, value in stage.values.items():
        resolved = resolve_value(value, outputs, manifest_of)
        tp = fields[key][1]
        try:
            kwargs[key] = coerce(resolved, tp)
        except _Mismatch:
            raise GraftError(f"[{stage.name}] key {key!r}: {value!r} resolved to {_describe(resolved)}, "
                             f"but {type_name(tp)} is expected. Fix: point the reference at another key") from None
    out_tp = fields[stage.kind.out_field][1]
    kwargs[stage.kind.out_field] = stage.out if _accepts_path(out_tp) else str(stage.out)
    return stage.config_class(**kwargs)


def _accepts_path(tp: Any) -> bool:
    if tp is Path:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return Path in typing.get_args(tp)
    return False
