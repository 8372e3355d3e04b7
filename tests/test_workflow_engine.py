"""The workflow engine on small stages defined here: skip, re-run downstream, --from/--to/--force,
resume after a killed process and after a raising stage, TOML errors, `graft status`.

The stages below are referenced from the test workflows as `kind = "test_workflow_engine:NAME"`
(pytest puts tests/ on sys.path; the subprocess tests set PYTHONPATH to it).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.errors import GraftError
from common.io import atomic_path, read_manifest, write_manifest
from workflows.cli import main
from workflows.commands import status_rows
from workflows.engine import run_workflow
from workflows.spec import load_workflow

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- test stages

@dataclass
class ConcatConfig:
    """Concatenate text files (or the out.txt of stage folders) and append a suffix."""

    inputs: list[str]
    out: str
    suffix: str = ""
    repeat: int = 1
    fail_if_exists: str = ""  # raise after writing half the output when this file exists
    progress: bool = True  # how it runs, not what it writes


def concat(cfg: ConcatConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for p in map(Path, cfg.inputs):
        parts.append((p / "out.txt" if p.is_dir() else p).read_text())
    (out / "out.txt").write_text(("".join(parts) + cfg.suffix) * cfg.repeat)
    if cfg.fail_if_exists and Path(cfg.fail_if_exists).exists():
        raise RuntimeError("disk on fire")
    write_manifest(out, stage="concat", config=cfg, counts={"chars": len((out / "out.txt").read_text())})
    return out


@dataclass
class ShardsConfig:
    """Write `n` shard files one at a time (skipping those already written), then a total."""

    source: str
    out: str
    n: int = 4
    kill_after: int = -1  # SIGKILL this process after writing that many shards in this call
    labels: list[str] = field(default_factory=list)
    progress: bool = True  # how it runs, not what it writes


def shards(cfg: ShardsConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    text = Path(cfg.source, "out.txt").read_text()
    written = 0
    for i in range(cfg.n):
        target = out / f"shard{i}.txt"
        if target.exists():  # finished in an earlier, interrupted call
            continue
        with atomic_path(target) as tmp:
            tmp.write_text(f"{i}:{text}")
        with open(out / "writes.log", "a") as f:
            f.write(f"{i}\n")
        written += 1
        if written == cfg.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    write_manifest(out, stage="shards", config=cfg, counts={"shards": cfg.n})
    return out


shards.graft_resumable = True


# ---------------------------------------------------------------- helpers

def _toml(tmp_path: Path, body: str, name: str = "wf") -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(textwrap.dedent(body).lstrip())
    return p


def _chain(tmp_path: Path, b_suffix: str = "B", extra: str = "") -> Path:
    src = tmp_path / "src.txt"
    if not src.exists():
        src.write_text("hello ")
    return _toml(tmp_path, f"""
        [workflow]
        name = "t"
        runs = "{tmp_path / 'runs'}"

        [a]
        kind = "test_workflow_engine:concat"
        inputs = ["{src}"]
        suffix = "A"

        [b]
        kind = "test_workflow_engine:concat"
        inputs = ["@a"]
        suffix = "{b_suffix}"
        {extra}

        [c]
        kind = "test_workflow_engine:concat"
        inputs = ["@b/out.txt", "@a"]
        suffix = "C"

        [d]
        kind = "test_workflow_engine:concat"
        inputs = ["{src}"]
        suffix = "D"
        """)


def _run(path: Path, **kw) -> list[str]:
    lines: list[str] = []
    run_workflow(load_workflow(path), echo=lines.append, **kw)
    return lines


def _ran(lines: list[str]) -> list[str]:
    return [ln.split("] ")[1].split(":")[0] for ln in lines if ": running " in ln]


def _skipped(lines: list[str]) -> list[str]:
    return [ln.split("] ")[1].split(":")[0] for ln in lines if ": skipped, unchanged" in ln]


def _out(tmp_path: Path, stage: str) -> str:
    return (tmp_path / "runs" / "t" / stage / "out.txt").read_text()


def _states(path: Path) -> dict[str, str]:
    return {r["stage"]: r["state"] for r in status_rows(path)}


# ---------------------------------------------------------------- tests

def test_runs_in_order_then_skips_everything_unchanged(tmp_path):
    wf = _chain(tmp_path)
    assert _ran(_run(wf)) == ["a", "b", "c", "d"]
    assert _out(tmp_path, "c") == "hello AB" + "hello A" + "C"
    ids = {s: read_manifest(tmp_path / "runs/t" / s)["workflow"]["output_id"] for s in "abcd"}

    lines = _run(wf)
    assert _ran(lines) == [] and _skipped(lines) == ["a", "b", "c", "d"]
    # Writing out a default value, or changing a setting that only affects how it runs, changes nothing.
    wf = _chain(tmp_path, extra="repeat = 1\nprogress = false")
    lines = _run(wf)
    assert _ran(lines) == [] and _skipped(lines) == ["a", "b", "c", "d"]
    assert {s: read_manifest(tmp_path / "runs/t" / s)["workflow"]["output_id"] for s in "abcd"} == ids
    assert _states(wf) == dict.fromkeys("abcd", "done")
    m = read_manifest(tmp_path / "runs/t/b")
    assert m["workflow"]["config"]["suffix"] == "B" and m["workflow"]["inputs"]["@a"] == ids["a"]
    assert m["status"] == "done" and m["config"]["suffix"] == "B"  # the stage's own manifest is kept


def test_changed_stage_reruns_with_everything_downstream(tmp_path):
    wf = _chain(tmp_path)
    _run(wf)
    wf = _chain(tmp_path, b_suffix="B2")
    states = {r["stage"]: (r["state"], r["why"]) for r in status_rows(wf)}
    assert states["b"] == ("stale", "config changed: suffix")
    assert states["c"][0] == "stale" and "upstream 'b'" in states["c"][1]
    assert states["a"][0] == states["d"][0] == "done"

    lines = _run(wf)
    assert _ran(lines) == ["b", "c"] and _skipped(lines) == ["a", "d"]
    assert _out(tmp_path, "c") == "hello AB2hello AC"


def test_changed_input_file_reruns_its_readers(tmp_path):
    wf = _chain(tmp_path)
    _run(wf)
    (tmp_path / "src.txt").write_text("bye ")
    assert _ran(_run(wf)) == ["a", "b", "c", "d"]
    assert _out(tmp_path, "d") == "bye D"


def test_from_to_and_force(tmp_path):
    wf = _chain(tmp_path)
    assert _ran(_run(wf, to_stage="b")) == ["a", "b"]
    assert _states(wf) == {"a": "done", "b": "done", "c": "pending", "d": "pending"}

    # --force b: b re-runs; c (downstream) runs because b's output is new; a and d untouched.
    _run(wf)
    lines = _run(wf, force=["b"])
    assert _ran(lines) == ["b", "c"] and _skipped(lines) == ["a", "d"]

    # --from c skips a and b even though b is stale, and uses b's existing output.
    wf = _chain(tmp_path, b_suffix="X")
    lines = _run(wf, from_stage="c", to_stage="c")
    assert _ran(lines) == [] and _skipped(lines) == ["c"]
    assert any("b: stale" in ln and "--from" in ln for ln in lines)
    lines = _run(wf, from_stage="b", to_stage="c")
    assert _ran(lines) == ["b", "c"] and "X" in _out(tmp_path, "c")
    assert any("stopping after c (--to)" in ln for ln in lines)

    with pytest.raises(GraftError, match="no stage named 'nope'.*a, b, c, d"):
        _run(wf, from_stage="nope")
    with pytest.raises(GraftError, match="comes after"):
        _run(wf, from_stage="c", to_stage="a")


def test_from_needs_finished_upstream(tmp_path):
    wf = _chain(tmp_path)
    with pytest.raises(GraftError, match="stage 'a' has no finished output.*--from a"):
        _run(wf, from_stage="c")


def test_raising_stage_is_failed_then_restarts_cleanly(tmp_path):
    flag = tmp_path / "fail.flag"
    flag.write_text("")
    wf = _chain(tmp_path, extra=f'fail_if_exists = "{flag}"')
    with pytest.raises(RuntimeError, match="disk on fire"):
        _run(wf)
    rows = {r["stage"]: r for r in status_rows(wf)}
    assert rows["a"]["state"] == "done" and rows["b"]["state"] == "failed"
    assert "disk on fire" in rows["b"]["why"]
    assert rows["c"]["state"] == "pending"
    # The half-written output does not look complete.
    assert (tmp_path / "runs/t/b/out.txt").exists() and not (tmp_path / "runs/t/b/manifest.json").exists()
    state = json.loads((tmp_path / "runs/t/.graft-state.json").read_text())
    assert state["stages"]["b"]["state"] == "failed"

    flag.unlink()  # fix the problem; the file's absence does not change the config
    lines = _run(wf)
    assert _ran(lines) == ["b", "c", "d"] and _skipped(lines) == ["a"]
    assert any("removing the previous output" in ln for ln in lines)  # non-resumable: restarted clean
    assert _states(wf) == dict.fromkeys("abcd", "done")


def _shards_toml(tmp_path: Path, kill_after: int) -> Path:
    src = tmp_path / "src.txt"
    src.write_text("x")
    return _toml(tmp_path, f"""
        [workflow]
        name = "t"
        runs = "{tmp_path / 'runs'}"

        [a]
        kind = "test_workflow_engine:concat"
        inputs = ["{src}"]

        [sh]
        kind = "test_workflow_engine:shards"
        source = "@a"
        n = 4
        kill_after = {kill_after}

        [z]
        kind = "test_workflow_engine:concat"
        inputs = ["@sh/shard3.txt"]
        """)


def _graft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}"}
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_killed_process_resumes_a_resumable_stage(tmp_path):
    wf = _shards_toml(tmp_path, kill_after=3)
    p = _graft("run", str(wf), cwd=tmp_path)
    assert p.returncode == -signal.SIGKILL, p.stderr
    out = tmp_path / "runs/t/sh"
    assert sorted(x.name for x in out.glob("shard*.txt")) == ["shard0.txt", "shard1.txt", "shard2.txt"]
    rows = {r["stage"]: r for r in status_rows(wf)}
    assert rows["a"]["state"] == "done"
    assert rows["sh"]["state"] == "failed" and "interrupted" in rows["sh"]["why"]
    assert rows["z"]["state"] == "pending"
    assert (tmp_path / "runs/t/.graft-lock").exists()  # left by the killed run; must not block the next

    # kill_after is not changed (same fingerprint), but this call writes only 1 shard: no kill.
    p = _graft("run", str(wf), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "sh: resuming" in p.stdout and "a: skipped, unchanged" in p.stdout
    assert (out / "writes.log").read_text().split() == ["0", "1", "2", "3"]  # nothing written twice
    assert _states(wf) == {"a": "done", "sh": "done", "z": "done"}

    p = _graft("status", str(wf), cwd=tmp_path)
    assert p.returncode == 0 and "3/3 stages done" in p.stdout
    assert [ln.split()[2] for ln in p.stdout.splitlines()[1:4]] == ["done"] * 3


def test_killed_stage_with_changed_config_keeps_its_work_until_forced(tmp_path):
    wf = _shards_toml(tmp_path, kill_after=3)
    assert _graft("run", str(wf), cwd=tmp_path).returncode == -signal.SIGKILL
    wf = _shards_toml(tmp_path, kill_after=-1)  # config changed: the partial output cannot be resumed
    # A config tweak never deletes an interrupted resumable stage's work (days of checkpoints).
    p = _graft("run", str(wf), cwd=tmp_path)
    assert p.returncode == 2
    assert "stage 'sh'" in p.stderr and "config changed: kill_after" in p.stderr and "--force sh" in p.stderr
    assert (tmp_path / "runs/t/sh/writes.log").read_text().split() == ["0", "1", "2"]
    assert _states(wf)["sh"] == "stale"
    # --force discards it and restarts from scratch.
    p = _graft("run", str(wf), "--force", "sh", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "removing the previous output" in p.stdout
    assert (tmp_path / "runs/t/sh/writes.log").read_text().split() == ["0", "1", "2", "3"]


def test_changed_cadence_setting_resumes_an_interrupted_stage(tmp_path):
    """`progress` (like a train stage's eval_every, log_every, save_every) changes how a stage runs, not
    what it writes: changing it after a kill resumes the interrupted work instead of clearing it."""
    wf = _shards_toml(tmp_path, kill_after=3)
    assert _graft("run", str(wf), cwd=tmp_path).returncode == -signal.SIGKILL
    text = wf.read_text()
    assert "[sh]\n" in text
    wf.write_text(text.replace("[sh]\n", "[sh]\nprogress = false\n", 1))
    p = _graft("run", str(wf), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "sh: resuming" in p.stdout
    assert (tmp_path / "runs/t/sh/writes.log").read_text().split() == ["0", "1", "2", "3"]


def test_stage_that_forgets_its_manifest_is_failed(tmp_path):
    wf = _toml(tmp_path, f"""
        [workflow]
        runs = "{tmp_path / 'runs'}"
        [x]
        kind = "test_workflow_engine:no_manifest"
        """)
    with pytest.raises(GraftError, match="returned without writing .*manifest.json"):
        _run(wf)
    assert _states(wf) == {"x": "failed"}


@dataclass
class NoManifestConfig:
    out: str


def no_manifest(cfg: NoManifestConfig) -> Path:
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return Path(cfg.out)


def test_refuses_foreign_output_folder(tmp_path):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    src = tmp_path / "s.txt"
    src.write_text("s")
    wf = _toml(tmp_path, f"""
        [workflow]
        runs = "{tmp_path / 'runs'}"
        [x]
        kind = "test_workflow_engine:concat"
        inputs = ["{src}"]
        out = "{foreign}"
        """)
    with pytest.raises(GraftError, match="precious: the output folder of stage 'x' exists and was not written"):
        _run(wf)
    assert (foreign / "thesis.tex").read_text() == "do not delete"
    # A finished folder of some other tool (a manifest, but not from this stage) is not deleted either.
    write_manifest(foreign, stage="embed.init", config={})
    with pytest.raises(GraftError, match="exists and was not written"):
        _run(wf)
    assert (foreign / "thesis.tex").exists()


def test_toml_errors_name_the_table_and_key(tmp_path):
    wf = _toml(tmp_path, """
        [workflow]
        name = "t"
        colour = "blue"

        [a]
        kind = "test_workflow_engine:concat"
        inputs = "not-a-list"
        suffx = "A"
        repeat = 1.5

        [b]
        kind = "test_workflow_engine:concat"
        inputs = ["@c", "@nowhere/x.txt"]

        [c]
        kind = "test_workflow_engine:concat"

        [d]
        kind = "no.such.kind"

        [e]
        kind = "embed.init"
        model = "@a"
        old_tokenizer = "@a"
        new_tokenizer = "@a"
        method = "meen"
        """)
    with pytest.raises(GraftError) as e:
        load_workflow(wf)
    msg = str(e.value)
    assert str(wf) in msg
    assert "[workflow] unknown key 'colour'" in msg
    assert "[a] key 'inputs': expected list of str, got string 'not-a-list'" in msg
    assert "[a] unknown key 'suffx' for kind 'test_workflow_engine:concat' (did you mean 'suffix'?)" in msg
    assert "[a] key 'repeat': expected int, got float 1.5" in msg
    assert "[b] '@c' names a later stage" in msg
    assert "[b] '@nowhere/x.txt' names no stage" in msg
    assert "[c] missing required key 'inputs'" in msg
    assert "[d] unknown stage kind 'no.such.kind'" in msg and "vocab.train" in msg
    # The config's own checks run at load time too, not hours later when the stage is reached.
    assert any("[e] `method` (--method) = 'meen' is not one of mean" in ln for ln in msg.splitlines())


def test_toml_syntax_error_names_the_line(tmp_path):
    wf = _toml(tmp_path, """
        [a]
        kind = "test_workflow_engine:concat"
        inputs = "x
        out = "y"
        """)
    with pytest.raises(GraftError, match=r"wf\.toml: invalid TOML: .*line 3"):
        load_workflow(wf)


def test_references_resolve_paths_and_manifest_values(tmp_path):
    src = tmp_path / "s.txt"
    src.write_text("abc")
    wf = _toml(tmp_path, f"""
        [workflow]
        name = "t"
        runs = "{tmp_path / 'runs'}"
        [a]
        kind = "test_workflow_engine:concat"
        inputs = ["{src}"]
        [b]
        kind = "test_workflow_engine:concat"
        inputs = ["@a/out.txt"]
        repeat = "@a#counts.chars"
        suffix = "@@literal"
        [c]
        kind = "test_workflow_engine:concat"
        inputs = ["@b"]
        suffix = "|n={{@a#counts.chars}} in {{@a/out.txt}}"
        """)
    _run(wf)
    assert _out(tmp_path, "b") == "abc@literal" * 3
    assert _out(tmp_path, "c") == "abc@literal" * 3 + f"|n=3 in {tmp_path / 'runs/t/a/out.txt'}"
    assert load_workflow(wf).stage("c").deps == ["a", "b"]
    # The reference is kept as written in the fingerprinted config, the resolved value in the stage's own.
    m = read_manifest(tmp_path / "runs/t/b")
    assert m["workflow"]["config"]["repeat"] == "@a#counts.chars" and m["config"]["repeat"] == 3


def test_cli_status_and_errors(tmp_path, capsys, monkeypatch):
    wf = _chain(tmp_path)
    assert main(["status", str(wf)]) == 0
    out = capsys.readouterr().out
    assert "STAGE" in out and "0/4 stages done" in out and "never run" in out
    assert main(["run", str(wf), "--to", "a"]) == 0
    capsys.readouterr()
    assert main(["status", str(wf), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["state"]) for r in rows] == [("a", "done"), ("b", "pending"), ("c", "pending"),
                                                        ("d", "pending")]
    assert rows[0]["figures"] == "chars 7" and rows[0]["duration_s"] is not None
    # No argument: the bundled demo (read from the package, outputs under ./runs).
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    n_demo = len(load_workflow(REPO / "workflows" / "demo.toml").stages)
    assert "corpora" in out and "runs/demo/report" in out and f"0/{n_demo} stages done" in out
    bad = _toml(tmp_path, "[a]\nkind = 3\n", name="bad")
    assert main(["run", str(bad)]) == 2
    assert "[a] key 'kind': expected str" in capsys.readouterr().err


def test_live_lock_blocks_a_second_run(tmp_path):
    wf = _chain(tmp_path)
    lock = tmp_path / "runs/t/.graft-lock"
    lock.parent.mkdir(parents=True)
    import socket
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(GraftError, match="another `graft run`"):
        _run(wf)
    lock.write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}))  # dead pid
    assert _ran(_run(wf)) == ["a", "b", "c", "d"]
    assert not lock.exists()


def test_after_adds_an_ordering_dependency(tmp_path):
    src = tmp_path / "s.txt"
    src.write_text("s")
    wf = _toml(tmp_path, f"""
        [workflow]
        name = "t"
        runs = "{tmp_path / 'runs'}"
        [x]
        kind = "test_workflow_engine:concat"
        inputs = ["{src}"]
        [y]
        kind = "test_workflow_engine:concat"
        inputs = ["{src}"]
        after = ["x"]
        [z]
        kind = "test_workflow_engine:concat"
        inputs = ["{src}"]
        """)
    assert load_workflow(wf).stage("y").deps == ["x"]
    _run(wf)
    lines = _run(wf, force=["x"])
    assert _ran(lines) == ["x", "y"] and _skipped(lines) == ["z"]
