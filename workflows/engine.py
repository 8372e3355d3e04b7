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

The parts: workflows/state.py (state file, lock), workflows/fingerprints.py (fingerprints, output ids),
workflows/plan.py (every stage's status, without running anything), and here: running the stages.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import time
from typing import Any, Callable

from common.errors import GraftError
from common.io import MANIFEST, atomic_write_json, is_complete, read_json
from workflows.fingerprints import _workflow_section, effective_values
from workflows.plan import StageStatus, plan
from workflows.spec import Stage, Workflow, build_config
from workflows.state import State, _lock

Echo = Callable[[str], None]


def _echo(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- running

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
    _say_where(wf.stages[hi], echo)
    return final


def _say_where(last: Stage, echo: Echo) -> None:
    """Where to look after a run: the report of the last stage run, else its output folder (once it is done)."""
    if _workflow_section(last.out) is None:
        return
    m = read_json(last.out / MANIFEST)
    shown = [(label, m[key]) for key, label in (("report_md", "Report"), ("report_html", "Report (HTML)"))
             if m.get(key)]
    for label, path in shown or [(f"Outputs of {last.name}", last.out.resolve())]:
        echo(f"{label}: {path}")


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
