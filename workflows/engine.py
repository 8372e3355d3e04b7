"""Run a workflow's stages in order, skipping what is unchanged and resuming what was interrupted.

How a stage is judged (see docs/workflows.md):
- Its *fingerprint* hashes its kind, the config values that differ from the dataclass defaults
  (references kept as written), the `output_id` of every stage it references, and the content of
  every existing file or folder named in its config (files over 64 MiB by size + mtime, so that
  a 600 GB corpus is not re-read on every run; hashes are cached in the state file).
- `output_id` is new each time a stage finishes, so a re-run upstream (changed or forced)
  makes everything downstream of it stale.
- A finished stage's manifest.json gets a "workflow" section: fingerprint, output_id, config,
  input hashes, duration. The stage is *done* when that fingerprint equals the current one and
  every stage it reads is done.
- The state file `{runs}/{name}/.graft-state.json` records, per stage, running/failed/done with
  the fingerprint, pid and error. A stage left "running" by a dead process is *failed*
  (interrupted). Re-running it with the same fingerprint resumes in place when the stage kind
  is resumable (corpus shards, training checkpoints); otherwise its folder is cleared and it
  restarts. A changed stage's old output is removed before it re-runs.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from common.errors import GraftError
from common.io import MANIFEST, atomic_write_json, file_sha256, is_complete, read_json, to_jsonable
from workflows.spec import Stage, Workflow, build_config, config_fields, iter_strings, parse_ref

STATE_FILE = ".graft-state.json"
LOCK_FILE = ".graft-lock"
CONTENT_HASH_LIMIT = 64 << 20  # bigger files are fingerprinted by size + mtime

Echo = Callable[[str], None]


def _echo(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- state file

class State:
    """The workflow's state file: per-stage records and a cache of input-file hashes."""

    def __init__(self, wf: Workflow):
        self.path = wf.home / STATE_FILE
        data = read_json(self.path) if self.path.is_file() else {}
        self.stages: dict[str, dict[str, Any]] = data.get("stages", {})
        self.hash_cache: dict[str, list] = data.get("hash_cache", {})
        self.workflow = str(wf.path)

    def save(self) -> None:
        atomic_write_json(self.path, {"workflow": self.workflow, "stages": self.stages,
                                      "hash_cache": self.hash_cache})

    def record(self, name: str) -> dict[str, Any]:
        return self.stages.get(name, {})


def _pid_alive(pid: int | None, host: str | None) -> bool:
    if not pid:
        return False
    if host and host != socket.gethostname():
        return True  # cannot check a process on another machine; assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- fingerprints

def _hash_path(path: Path, cache: dict[str, list]) -> str:
    """Content hash of a file, or of a folder's files (names + hashes); big files by size+mtime."""
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts):
                h.update(f"{p.relative_to(path).as_posix()}\0{_hash_path(p, cache)}\n".encode())
        return "dir:" + h.hexdigest()
    st = path.stat()
    if st.st_size > CONTENT_HASH_LIMIT:
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    key = str(path.resolve())
    hit = cache.get(key)
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        return hit[2]
    digest = "sha256:" + file_sha256(path)
    cache[key] = [st.st_size, st.st_mtime_ns, digest]
    return digest


def _external_inputs(values: dict[str, Any], cache: dict[str, list]) -> dict[str, str]:
    """Hashes of the existing files/folders (and glob matches) named by non-reference strings."""
    out: dict[str, str] = {}
    for s in iter_strings(values):
        if parse_ref(s) is not None or not s or len(s) > 4096 or "{@" in s:
            continue
        if any(c in s for c in "*?["):
            matches = sorted(glob.glob(s, recursive=True))
            if matches:
                h = hashlib.sha256()
                for m in matches:
                    h.update(f"{m}\0{_hash_path(Path(m), cache)}\n".encode())
                out[s] = "glob:" + h.hexdigest()
            continue
        try:
            p = Path(s)
            if p.exists():
                out[s] = _hash_path(p, cache)
        except OSError:
            continue
    return out


def effective_values(stage: Stage) -> dict[str, Any]:
    """TOML values plus the config's defaults (the output folder excluded)."""
    vals: dict[str, Any] = {}
    for name, (f, _) in config_fields(stage.config_class).items():
        if name == stage.kind.out_field:
            continue
        if name in stage.values:
            vals[name] = stage.values[name]
        elif f.default is not dataclasses.MISSING:
            vals[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            vals[name] = f.default_factory()
    return to_jsonable(vals)


def _volatile(stage: Stage) -> set[str]:
    return {"progress", *stage.kind.volatile}


def _non_default_values(stage: Stage) -> dict[str, Any]:
    """The TOML values that differ from the config's defaults.

    Hashing these (not the full effective config) means a field added to a stage's config in a
    new version, or a value written out that equals its default, does not re-run a two-week
    stage. The flip side: a changed *default* goes unnoticed; use --force after such an upgrade.
    """
    out = {}
    effective = effective_values(stage)
    for name, (f, _) in config_fields(stage.config_class).items():
        if name == stage.kind.out_field or name not in stage.values or name in _volatile(stage):
            continue
        if f.default is not dataclasses.MISSING:
            default = to_jsonable(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = to_jsonable(f.default_factory())
        else:
            default = dataclasses.MISSING
        if effective[name] != default:
            out[name] = effective[name]
    return out


def fingerprint(stage: Stage, upstream_ids: dict[str, str | None], cache: dict[str, list]) -> tuple[str, dict]:
    inputs = {f"@{d}": upstream_ids.get(d) for d in stage.deps}
    inputs.update(_external_inputs(stage.values, cache))
    blob = json.dumps({"kind": stage.kind.name, "config": _non_default_values(stage), "inputs": inputs},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:20], inputs


def _workflow_section(out: Path) -> dict[str, Any] | None:
    if not is_complete(out):
        return None
    try:
        section = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("workflow")
    except (OSError, json.JSONDecodeError):
        return None
    return section if isinstance(section, dict) else None


# ---------------------------------------------------------------- status

@dataclass
class StageStatus:
    stage: Stage
    state: str  # done | stale | pending | failed | running | submitted; Slurm jobs also: cancelled | timeout
    reason: str
    fingerprint: str
    inputs: dict[str, Any] = field(default_factory=dict)
    duration_s: float | None = None
    jobs: str = ""  # Slurm job ids of the stage, when it was submitted with --executor slurm
    log: str = ""  # the log of a failed Slurm job
    live_jobs: list[str] = field(default_factory=list)  # its jobs still pending or running


def upstream_ids(wf: Workflow, stage: Stage) -> dict[str, str | None]:
    """The output_id of every stage `stage` reads (None where it has no finished output)."""
    ids = {}
    for d in stage.deps:
        sec = _workflow_section(wf.stage(d).out)
        ids[d] = sec.get("output_id") if sec else None
    return ids


def plan(wf: Workflow, state: State, trusted: set[str] = frozenset()) -> list[StageStatus]:
    """Every stage's state as of now, without running anything.

    `trusted` stages (those before --from) count as done for their readers: their existing
    output is what the later stages use. Stages submitted to Slurm are looked up there (squeue,
    sacct) and in their jobs' completion markers.
    """
    from workflows import slurm_exec

    result: dict[str, StageStatus] = {}
    jobs = slurm_exec.query_records(state)
    for stage in wf.stages:
        fp, inputs = fingerprint(stage, upstream_ids(wf, stage), state.hash_cache)
        rec = state.record(stage.name)
        section = _workflow_section(stage.out)
        not_done = [d for d in stage.deps if result[d].state != "done" and d not in trusted]
        duration = (section or {}).get("duration_s") or rec.get("duration_s")
        from_slurm = None
        if rec.get("state") == "slurm" and not (section and section.get("fingerprint") == fp and not not_done):
            from_slurm = slurm_exec.stage_status(wf, stage, rec, jobs, fp, inputs, has_output=section is not None)
        if from_slurm is not None:
            st = from_slurm
        elif rec.get("state") == "running" and _pid_alive(rec.get("pid"), rec.get("host")):
            st = StageStatus(stage, "running", f"pid {rec.get('pid')} on {rec.get('host')}", fp, inputs)
        elif rec.get("state") == "submitted" and rec.get("fingerprint") == fp:
            st = StageStatus(stage, "submitted", f"sbatch {rec.get('script')}", fp, inputs)
        elif rec.get("state") in ("running", "failed") and rec.get("fingerprint") == fp:
            why = rec.get("error") or "interrupted (the process ended mid-stage)"
            st = StageStatus(stage, "failed", why, fp, inputs, rec.get("duration_s"))
        elif section and section.get("fingerprint") == fp and not not_done:
            st = StageStatus(stage, "done", "unchanged", fp, inputs, duration)
        elif section or rec:
            if not_done:
                why = f"upstream {not_done[0]!r} is {result[not_done[0]].state}"
            elif section is None:  # an interrupted run: what changed since it started, where recorded
                why = _what_changed(rec, fp, inputs, stage) if "config" in rec else "no finished output"
            else:
                why = _what_changed(section, fp, inputs, stage)
            st = StageStatus(stage, "stale", why, fp, inputs, duration)
        else:
            st = StageStatus(stage, "pending", "never run", fp, inputs)
        if rec.get("state") == "slurm" and not st.jobs:
            st.jobs = slurm_exec.job_ids(rec)
        result[stage.name] = st
    return list(result.values())


def _what_changed(section: dict[str, Any], fp: str, inputs: dict[str, Any], stage: Stage) -> str:
    old_cfg, new_cfg = section.get("config", {}), effective_values(stage)
    keys = sorted(k for k in set(old_cfg) | set(new_cfg)
                  if old_cfg.get(k) != new_cfg.get(k) and k not in _volatile(stage))
    if keys:
        return "config changed: " + ", ".join(keys)
    old_in = section.get("inputs", {})
    changed = sorted(k for k in set(old_in) | set(inputs) if old_in.get(k) != inputs.get(k))
    ups = [k[1:] for k in changed if k.startswith("@")]
    if ups:
        return "upstream re-ran: " + ", ".join(ups)
    if changed:
        return "input changed: " + ", ".join(changed)
    return "stage kind or version changed"


# ---------------------------------------------------------------- running

@contextmanager
def _lock(wf: Workflow) -> Iterator[None]:
    wf.home.mkdir(parents=True, exist_ok=True)
    path = wf.home / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                other = {}
            if _pid_alive(other.get("pid"), other.get("host")):
                raise GraftError(f"{path}: another `graft run` (pid {other.get('pid')} on {other.get('host')}) is "
                                 "running this workflow. Fix: wait for it, or delete the lock file if that "
                                 "process is gone") from None
            path.unlink(missing_ok=True)  # left by a killed run
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise GraftError(f"{path}: could not take the workflow lock. Fix: delete the file and retry")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _on_sigterm(signum, frame):  # a batch scheduler's SIGTERM: record the stage as failed, then exit
    raise SystemExit(143)


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _clear_output(stage: Stage, owned: bool) -> None:
    """Remove a stage's previous or half-written output before it (re)starts.

    Only what this workflow wrote is removed: a folder recorded as this stage's output, or one whose
    manifest names this stage. Anything else in the way is an error, never deleted.
    """
    _clear_output_leftovers(stage)
    out = stage.out
    if not out.exists():
        return
    section = None
    if (out / MANIFEST).is_file():
        try:
            section = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("workflow")
        except (OSError, json.JSONDecodeError):
            section = None
    ours = owned or (isinstance(section, dict) and section.get("stage") == stage.name)
    if not ours and not (out.is_dir() and not any(out.iterdir())):
        raise GraftError(f"{out}: the output folder of stage {stage.name!r} exists and was not written by this "
                         "workflow. Fix: move it away, or set another `out` for the stage")
    shutil.rmtree(out) if out.is_dir() else out.unlink()


def stage_range(wf: Workflow, from_stage: str | None, to_stage: str | None, force=()) -> tuple[int, int]:
    """Indices of the first and last stage to run; unknown stage names are errors."""
    names = [s.name for s in wf.stages]
    for n in [from_stage, to_stage, *force]:
        if n is not None:
            wf.stage(n)
    lo = names.index(from_stage) if from_stage else 0
    hi = names.index(to_stage) if to_stage else len(names) - 1
    if lo > hi:
        raise GraftError(f"--from {from_stage} comes after --to {to_stage} in {wf.path}. Fix: swap them")
    return lo, hi


def run_workflow(wf: Workflow, *, from_stage: str | None = None, to_stage: str | None = None,
                 force: list[str] | tuple[str, ...] = (), echo: Echo = _echo) -> list[StageStatus]:
    """Run the stages in file order within [from_stage, to_stage]; returns the final statuses."""
    lo, hi = stage_range(wf, from_stage, to_stage, force)
    forced = set(force)
    with _lock(wf):
        old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return _run(wf, lo, hi, forced, echo)
        finally:
            signal.signal(signal.SIGTERM, old_handler)


def _run(wf: Workflow, lo: int, hi: int, forced: set[str], echo: Echo) -> list[StageStatus]:
    state = State(wf)
    n = len(wf.stages)
    echo(f"workflow {wf.name} ({wf.path}): {n} stages, outputs under {wf.home}")
    t0 = time.time()
    ran: list[str] = []
    needed = {d for s in wf.stages[lo:hi + 1] for d in s.deps}
    trusted = {s.name for s in wf.stages[:lo]}
    statuses: dict[str, StageStatus] = {}
    planned_at = -1  # len(ran) when `statuses` was computed
    for i, stage in enumerate(wf.stages):
        if planned_at != len(ran):  # only a stage that ran changes what the plan says (and it hashes every input)
            statuses = {s.stage.name: s for s in plan(wf, state, trusted)}
            planned_at = len(ran)
        st = statuses[stage.name]
        tag = f"[{i + 1}/{n}] {stage.name}"
        if i < lo:
            if stage.name in needed and not is_complete(stage.out):
                raise GraftError(f"stage {stage.name!r} has no finished output in {stage.out}, and --from "
                                 f"{wf.stages[lo].name} skips it. Fix: run without --from, or --from {stage.name}")
            if stage.name in needed and st.state != "done":
                echo(f"{tag}: {st.state} ({st.reason}); not run because of --from, its existing output is used")
            continue
        if i > hi:
            echo(f"stopping after {wf.stages[hi].name} (--to); {n - hi - 1} later stage(s) not run")
            break
        if st.state == "done" and stage.name not in forced:
            echo(f"{tag}: skipped, unchanged (done in {_fmt_s(st.duration_s)}; {stage.out})")
            continue
        if st.live_jobs and stage.launch is not None and stage.launch.mode == "slurm":
            echo(f"{tag}: waiting for its Slurm job ({st.reason}); run `graft run` again once it has finished "
                 f"(`graft status {wf.path}` follows it). Stages after it need its output.")
            break
        if st.live_jobs:
            raise GraftError(f"stage {stage.name!r} is {st.state} in Slurm ({st.reason}). Fix: wait for it "
                             f"(`graft status {wf.path}`), or cancel the workflow's jobs with `graft cancel "
                             f"{wf.path}` before running it here")
        if st.state == "running":
            raise GraftError(f"stage {stage.name!r} is being run by {st.reason}. Fix: wait for it to finish")
        if st.state == "submitted" and stage.name not in forced:
            if is_complete(stage.out):
                echo(f"{tag}: its Slurm job has finished; recording it")
                _finish(wf, stage, st, state, state.record(stage.name).get("started", time.time()), echo, tag)
                ran.append(stage.name)
                continue
            echo(f"{tag}: waiting for its Slurm job ({st.reason}); run `graft run` again once the job has "
                 f"finished. Stages after it need its output.")
            break
        why = "forced (--force)" if stage.name in forced else st.reason
        if not _run_stage(wf, stage, st, state, why, tag, echo):
            break  # submitted as a job: later stages need its output
        ran.append(stage.name)
    final = plan(wf, state)
    state.save()
    echo(f"workflow {wf.name}: {len(ran)} stage(s) run, {sum(s.state == 'done' for s in final)}/{n} done "
         f"({_fmt_s(time.time() - t0)})")
    last = wf.stages[hi]
    sec = _workflow_section(last.out)
    if sec is not None:
        m = read_json(last.out / MANIFEST)
        shown = [(label, m[key]) for key, label in (("report_md", "Report"), ("report_html", "Report (HTML)"))
                 if m.get(key)]
        for label, path in shown or [(f"Outputs of {last.name}", last.out.resolve())]:
            echo(f"{label}: {path}")
    return final


def _run_stage(wf: Workflow, stage: Stage, st: StageStatus, state: State, why: str, tag: str,
               echo: Echo) -> bool:
    """Run (or submit) one stage; False when it was submitted as a job and is not finished."""
    if stage.launch is not None and stage.launch.mode == "slurm":
        from workflows import slurm, slurm_exec

        if slurm.available():  # submitted for real, tracked by its job id; else the script is written below
            slurm_exec.submit_stage(wf, state, stage, st, tag, echo)
            return False
    rec = state.record(stage.name)
    same = rec.get("state") in ("running", "failed", "submitted") and rec.get("fingerprint") == st.fingerprint
    owned = bool(rec) and rec.get("out") == str(stage.out)
    # A stage that finished but was killed before its manifest got the workflow section: adopt it.
    if (same and is_complete(stage.out) and why != "forced (--force)"
            and (stage.out / MANIFEST).stat().st_mtime >= rec.get("started", 0)):
        echo(f"{tag}: the interrupted run had finished its output; recording it")
        _finish(wf, stage, st, state, rec.get("started", time.time()), echo, tag)
        return True
    if same and stage.kind.resumable and stage.out.exists() and why != "forced (--force)":
        echo(f"{tag}: resuming ({stage.kind.name} continues from what the interrupted run wrote)")
        _clear_output_leftovers(stage)
    else:
        keep_partial_work(stage, why)
        if stage.out.exists():
            echo(f"{tag}: {why}; removing the previous output {stage.out}")
        _clear_output(stage, owned)
    if stage.launch is not None and stage.launch.mode == "slurm":
        return _submit(wf, stage, st, state, why, tag, echo)
    echo(f"{tag}: running {stage.kind.name} ({why}) -> {stage.out}")
    started = time.time()
    cpu0 = _cpu_seconds()
    state.stages[stage.name] = {"state": "running", "fingerprint": st.fingerprint, "pid": os.getpid(),
                                "host": socket.gethostname(), "started": started, "out": str(stage.out),
                                "config": effective_values(stage), "inputs": st.inputs}
    state.save()
    try:
        stage.kind.fn()(_stage_config(wf, stage))
        if not is_complete(stage.out):
            raise GraftError(f"stage {stage.name!r} ({stage.kind.name}) returned without writing "
                             f"{stage.out / MANIFEST}. This is a bug in the stage; please report it")
    except BaseException as e:
        err = ("interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit))
               else f"{type(e).__name__}: {e}".strip())
        state.stages[stage.name].update(state="failed", error=err.splitlines()[0][:500] if err else "failed",
                                        duration_s=round(time.time() - started, 3))
        state.save()
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            echo(f"{tag}: FAILED after {_fmt_s(time.time() - started)}: {err.splitlines()[0] if err else ''}\n"
                 f"  Fix the problem and re-run the same command: finished stages are skipped, this one "
                 f"{'resumes' if stage.kind.resumable else 'restarts'}.")
        if isinstance(e, OSError):  # full disk, failing filesystem: one clear error naming the output
            from common.errors import io_failure
            from common.io import settle_partial_output

            done = settle_partial_output(stage.out, {"existed": False, "manifest": None}, stage.kind.resumable)
            raise io_failure(e, stage.out, done, what=f"stage {stage.name!r}") from None
        raise
    _finish(wf, stage, st, state, started, echo, tag, cpu_s=_cpu_seconds() - cpu0)
    return True


def _stage_config(wf: Workflow, stage: Stage) -> Any:
    """The stage's config object, with references to other stages resolved to their outputs."""
    outputs = {s.name: s.out for s in wf.stages}
    return build_config(stage, outputs, lambda name: read_json(wf.stage(name).out / MANIFEST))


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (stage worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _submit(wf: Workflow, stage: Stage, st: StageStatus, state: State, why: str, tag: str, echo: Echo) -> bool:
    from workflows.launch import LAUNCHERS

    toml_path, script = LAUNCHERS[stage.kind.name](_stage_config(wf, stage), stage.launch, wf.home, stage.name)
    state.stages[stage.name] = {"state": "submitted", "fingerprint": st.fingerprint, "script": str(script),
                                "config_toml": str(toml_path), "started": time.time(), "out": str(stage.out)}
    state.save()
    echo(f"{tag}: {why}; this stage runs as a Slurm job ({stage.launch.nodes} node(s) x "
         f"{stage.launch.gpus_per_node} GPU(s), {stage.launch.config}), but `sbatch` is not on this machine.\n"
         f"  wrote {toml_path} and {script}\n"
         f"  submit it on the cluster with:  sbatch {script}\n"
         f"  then, once the job has finished, run the same `graft run` again to continue. (Where sbatch is on "
         f"PATH, `graft run` submits the job itself and tracks it by its id.)")
    return False


def keep_partial_work(stage: Stage, why: str) -> None:
    """Refuse to delete an interrupted resumable stage's work (checkpoints, finished shards) because its
    settings changed: a config tweak must not destroy days of training. --force discards it."""
    if not why.startswith("config changed"):
        return  # an upstream stage or an input file changed: the partial work no longer applies
    if stage.kind.resumable and stage.out.is_dir() and not is_complete(stage.out) and any(stage.out.iterdir()):
        raise GraftError(f"stage {stage.name!r}: {stage.out} holds the work of an interrupted run, and the stage "
                         f"can no longer resume it ({why}). Fix: restore the settings it ran with to resume it, "
                         f"or run again with --force {stage.name} to discard that work and start over")


def _clear_output_leftovers(stage: Stage) -> None:
    out = stage.out
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for leftover in out.parent.glob(pattern):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def record_output(wf: Workflow, stage: Stage, fp: str, inputs: dict[str, Any], started: float,
                  cpu_s: float | None = None, **extra: Any) -> dict[str, Any]:
    """Write the `workflow` section into the stage's finished manifest.json; returns the manifest."""
    finished = time.time()
    manifest_path = stage.out / MANIFEST
    m = read_json(manifest_path)
    nonce = f"{fp}:{finished}:{os.getpid()}"
    m["workflow"] = {
        "name": wf.name, "file": str(wf.path), "stage": stage.name, "kind": stage.kind.name,
        "fingerprint": fp, "output_id": hashlib.sha256(nonce.encode()).hexdigest()[:20],
        "config": effective_values(stage), "inputs": inputs,
        "started": started, "finished": finished, "duration_s": round(finished - started, 3),
        "cpu_s": None if cpu_s is None else round(cpu_s, 3), **extra,
    }
    atomic_write_json(manifest_path, m)
    return m


def _finish(wf: Workflow, stage: Stage, st: StageStatus, state: State, started: float, echo: Echo,
            tag: str, cpu_s: float | None = None) -> None:
    m = record_output(wf, stage, st.fingerprint, st.inputs, started, cpu_s)
    finished = m["workflow"]["finished"]
    state.stages[stage.name] = {"state": "done", "fingerprint": st.fingerprint, "out": str(stage.out),
                                "started": started, "finished": finished,
                                "duration_s": round(finished - started, 3)}
    state.save()
    from workflows.figures import key_figures

    figures = key_figures(stage.kind.name, m)
    echo(f"{tag}: done in {_fmt_s(finished - started)}" + (f" ({figures})" if figures else ""))
