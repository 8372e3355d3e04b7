"""`graft run --executor slurm`, `graft cancel`, and the job side (`graft run-stage`).

Submitting (under the workflow lock, in the `graft run` process):
- every stage in range that is not done gets `sbatch` jobs: a `corpus.prepare` stage an array of
  `tasks` tasks (`--shard-index $SLURM_ARRAY_TASK_ID`) and a finalize job after it; the train stage
  one multi-node job (`srun` + `accelerate launch`); any other stage one job;
- a stage waits for the jobs of the stages it reads with `--dependency=afterok:...` and
  `--kill-on-invalid-dep=yes` (a failed upstream cancels it instead of leaving it pending forever);
- job ids, log paths and the array size go into the state file, as `state = "slurm"`.
- a stage whose jobs are still pending or running is never submitted again; its job ids become
  the dependencies of what follows.
- after a failure, an array stage whose settings are unchanged resubmits only the tasks without a
  completion marker, plus its finalize job and everything downstream.

Each job runs `graft run-stage`, which never writes the state file (jobs run concurrently); it
writes the stage's output and manifest (with the `workflow` section, fingerprinted from the
upstream outputs as they are when it runs), and a marker per task under
{runs}/{name}/slurm/markers/STAGE/: completed or failed, read by `graft status` once Slurm has
forgotten the job (no accounting storage and past MinJobAge).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common.errors import GraftError
from common.io import atomic_write_json, atomic_write_text, is_complete, read_json
from workflows import fingerprints, slurm
from workflows import plan as stage_plan
from workflows import state as state_file
from workflows.spec import Stage, Workflow

Echo = Callable[[str], None]
_ORDER = ("running", "pending", "failed", "timeout", "cancelled", "lost", "completed")


def slurm_dir(wf: Workflow) -> Path:
    return wf.home / slurm.SLURM_DIR


def marker_dir(wf: Workflow, stage: str) -> Path:
    return slurm_dir(wf) / "markers" / stage


def _marker(wf: Workflow, stage: str, label: str) -> dict[str, Any]:
    path = marker_dir(wf, stage) / f"{label}.json"
    try:
        return read_json(path) if path.is_file() else {}
    except GraftError:
        return {}


# ---------------------------------------------------------------- status

def query_records(state: Any) -> dict[str, slurm.JobInfo]:
    """One Slurm query for every job the state file records."""
    ids = [j["id"] for rec in state.stages.values() if rec.get("state") == "slurm" for j in rec.get("jobs", [])]
    return slurm.query(ids) if ids else {}


def job_ids(rec: dict[str, Any]) -> str:
    """'12_[0-2],13' (squeue's notation for array tasks): a record's Slurm jobs, for `graft status`."""
    return ",".join(f"{j['id']}_[{_ranges(j['tasks'])}]" if j["role"] == "array" else j["id"]
                    for j in rec.get("jobs", []))


def _job_units(rec: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(Slurm key, marker label, log path) of every job and array task of a record."""
    units = []
    for j in rec.get("jobs", []):
        if j["role"] == "array":
            for t in j["tasks"]:
                units.append((f"{j['id']}_{t}", f"task-{t}", j["log"].replace("%A", j["id"]).replace("%a", str(t))))
        else:
            units.append((j["id"], j["role"], j["log"].replace("%j", j["id"])))
    return units


def stage_status(wf: Workflow, stage: Stage, rec: dict[str, Any], jobs: dict[str, slurm.JobInfo],
                 fp: str, inputs: dict[str, Any], has_output: bool = False):
    """A Slurm-run stage's state from its jobs: the first of running, pending, failed, timeout,
    cancelled, lost (unknown to Slurm and no marker) that any job is in. None when every job completed
    and the stage has a finished output: whether that is done or stale is the plan's usual rule."""
    from workflows.plan import StageStatus

    seen: list[tuple[str, str, str, str]] = []  # state, key, reason, log
    for key, label, log in _job_units(rec):
        info = jobs.get(key)
        if info is not None:
            seen.append((info.state, key, info.reason, log))
            continue
        marker = _marker(wf, stage.name, label)
        state = marker.get("state", "lost")
        seen.append((state, key, marker.get("error", "") if state == "failed" else
                     ("" if state == "completed" else "Slurm no longer knows the job and it left no marker"), log))
    ids = job_ids(rec)
    live = [key for state, key, _, _ in seen if state in slurm.LIVE]
    worst = min(seen, key=lambda s: _ORDER.index(s[0])) if seen else ("lost", "", "no jobs recorded", "")
    state, key, reason, log = worst
    if state == "completed" and has_output:
        return None
    if state == "completed":
        return StageStatus(stage, "failed", f"jobs {ids} completed, but {stage.out} has no finished output",
                           fp, inputs, jobs=ids, live_jobs=live)
    shown = {"lost": "failed", "completed": "done"}.get(state, state)
    n_same = sum(s[0] == state for s in seen)
    why = f"job {key} {state}" + (f" ({reason})" if reason else "") + (f", {n_same - 1} more" if n_same > 1 else "")
    shown_log = log if shown in ("failed", "timeout") or (shown == "cancelled" and Path(log).is_file()) else ""
    return StageStatus(stage, shown, why, fp, inputs, jobs=ids, log=shown_log, live_jobs=live)


# ---------------------------------------------------------------- submitting

@dataclass
class _Action:
    stage: Stage
    tasks: int = 1  # array size (array stages)
    todo: list[int] = field(default_factory=list)  # array tasks to run now
    fresh: bool = True  # clear the output and markers first
    after: list[str] = field(default_factory=list)  # stages whose new jobs this one waits for
    forced: set[str] = field(default_factory=set)  # --force


def _config_fp(stage: Stage, cache: dict) -> str:
    """The stage's fingerprint without its upstream output ids (unknown before they have run)."""

    return fingerprints.fingerprint(stage, {d: "-" for d in stage.deps}, cache)[0]


def _array_size(wf: Workflow, stage: Stage, res: slurm.SlurmResources) -> int:
    if res.tasks:
        return res.tasks
    from corpus.readers import expand_inputs
    from workflows.refs import parse_ref, refs_in

    files = stage.values.get("files") or []
    if not files or refs_in(files) or any(parse_ref(f) for f in files):
        return 1  # the inputs are another stage's output: not known yet
    try:
        return max(1, min(len(expand_inputs(files)), slurm.MAX_AUTO_TASKS))
    except GraftError:
        return 1


def submit_workflow(wf: Workflow, *, from_stage: str | None = None, to_stage: str | None = None,
                    force: list[str] | tuple[str, ...] = (), dry_run: bool = False, echo: Echo = print) -> list[str]:
    """Submit every stage in range that is not done, chained; returns the new job ids."""
    from workflows import engine

    lo, hi = engine.stage_range(wf, from_stage, to_stage, force)
    if not dry_run:
        slurm._tool("sbatch")
    with state_file._lock(wf):
        state = state_file.State(wf)
        trusted = {s.name for s in wf.stages[:lo]}
        statuses = {st.stage.name: st for st in stage_plan.plan(wf, state, trusted)}
        actions = _decide(wf, state, statuses, lo, hi, set(force), echo)
        scripts = {a.stage.name: _write_scripts(wf, a, dry_run) for a in actions}
        if not dry_run:
            _check_with_slurm(actions, scripts)
        new_jobs: dict[str, list[str]] = {}
        live = {name: st.live_jobs for name, st in statuses.items() if st.live_jobs}
        submitted: list[str] = []
        for a in actions:
            after = sorted({j.split("_")[0] for d in a.stage.deps for j in new_jobs.get(d, live.get(d, []))}, key=int)
            ids = _submit(wf, state, statuses[a.stage.name], a, scripts[a.stage.name], after, dry_run, echo)
            new_jobs[a.stage.name] = ids
            submitted += ids
        state.save()
    if not actions:
        echo(f"workflow {wf.name}: nothing to submit")
    elif not dry_run:
        echo(f"workflow {wf.name}: {len(submitted)} job(s) submitted. Follow them with `graft status {wf.path}`; "
             f"cancel them with `graft cancel {wf.path}`.")
    return submitted


def _decide(wf: Workflow, state: Any, statuses: dict, lo: int, hi: int, forced: set[str], echo: Echo) -> list[_Action]:
    actions: list[_Action] = []
    redo: set[str] = set()
    n = len(wf.stages)
    for i, stage in enumerate(wf.stages[lo:hi + 1], start=lo):
        st = statuses[stage.name]
        tag = f"[{i + 1}/{n}] {stage.name}"
        for d in stage.deps:
            if d in {s.name for s in wf.stages[:lo]} and not is_complete(wf.stage(d).out):
                raise GraftError(f"stage {d!r} has no finished output in {wf.stage(d).out}, and --from "
                                 f"{wf.stages[lo].name} skips it. Fix: run without --from, or --from {d}")
        upstream_redo = [d for d in stage.deps if d in redo]
        if st.live_jobs:
            if upstream_redo:
                raise GraftError(f"stage {stage.name!r} is {st.state} in Slurm (jobs {st.jobs}), but {upstream_redo[0]!r}, "
                                 f"which it reads, must run again. Fix: `graft cancel {wf.path}`, then run again")
            echo(f"{tag}: already {st.state} in Slurm (jobs {st.jobs}); not submitted again")
            continue
        if st.state == "done" and stage.name not in forced and not upstream_redo:
            echo(f"{tag}: skipped, unchanged ({stage.out})")
            continue
        if st.state == "running":
            raise GraftError(f"stage {stage.name!r} is being run by {st.reason}. Fix: wait for it to finish")
        action = _action_for(wf, state, stage, st, upstream_redo, forced)
        redo.add(stage.name)
        actions.append(action)
        _echo_action(action, st, tag, echo)
    return actions


def _echo_action(action: _Action, st: Any, tag: str, echo: Echo) -> None:
    if action.fresh:
        echo(f"{tag}: {'forced (--force)' if action.stage.name in action.forced else st.reason}; submitting")
    else:
        echo(f"{tag}: {st.state} ({st.reason}); resubmitting what is not complete")


def _action_for(wf: Workflow, state: Any, stage: Stage, st: Any, upstream_redo: list[str],
                forced: set[str]) -> _Action:
    """Submit afresh, or (a resumable stage with unchanged settings and inputs) only what is not complete."""
    rec = state.record(stage.name)
    unchanged = ((rec.get("state") == "slurm" and rec.get("config_fp") == _config_fp(stage, state.hash_cache))
                 or (rec.get("state") in ("running", "failed") and rec.get("fingerprint") == st.fingerprint))
    same = unchanged and stage.kind.resumable and not upstream_redo and stage.name not in forced
    action = _Action(stage, after=upstream_redo, fresh=not same, forced=forced)
    if stage.kind.array:  # one task: a plain job (no array, no finalize step)
        action.tasks = rec.get("tasks", 1) if same and rec.get("state") == "slurm" else \
            _array_size(wf, stage, slurm.stage_resources(stage, wf.slurm))
        action.todo = [t for t in range(action.tasks)
                       if not same or _marker(wf, stage.name, f"task-{t}").get("state") != "completed"]
    return action


def submit_stage(wf: Workflow, state: Any, stage: Stage, st: Any, tag: str, echo: Echo) -> list[str]:
    """The local executor's way to run a `launch.mode = "slurm"` stage: submit it alone (its upstream is
    done), record its job, and let `graft run` stop until the job has finished."""
    action = _action_for(wf, state, stage, st, [], set())
    _echo_action(action, st, tag, echo)
    scripts = _write_scripts(wf, action, dry_run=False)
    _check_with_slurm([action], {stage.name: scripts})
    ids = _submit(wf, state, st, action, scripts, [], False, echo)
    echo(f"  the stages after it need its output: run `graft run {wf.path}` again once job {ids[-1]} has "
         f"finished (`graft status {wf.path}` follows it)")
    return ids


def _check_with_slurm(actions: list[_Action], scripts: dict[str, dict[str, Path]]) -> None:
    """`sbatch --test-only` for every job first: a refused one leaves nothing of the chain queued."""
    for a in actions:
        for role, path in scripts[a.stage.name].items():
            slurm.sbatch(path, array=_ranges(a.todo) if role == "array" else None, stage=a.stage.name,
                         test_only=True)


def _write_scripts(wf: Workflow, a: _Action, dry_run: bool) -> dict[str, Path]:
    res = slurm.stage_resources(a.stage, wf.slurm)
    folder = slurm_dir(wf)
    logs = (folder / "logs").resolve()
    name = a.stage.name
    if slurm.needs_gpus(a.stage.kind.name):
        train_toml = wf.home / "launch" / f"{name}.toml"
        texts = {"main": slurm.train_script(wf, a.stage, res, logs / f"{name}-%j.out", train_toml)}
    elif a.stage.kind.array and a.tasks > 1:
        texts = {"array": slurm.stage_script(wf, a.stage, res, logs / f"{name}-%A_%a.out", array=True, tasks=a.tasks),
                 "finalize": slurm.stage_script(wf, a.stage, res, logs / f"{name}-finalize-%j.out", array=False,
                                                finalize=True)}
    else:
        texts = {"main": slurm.stage_script(wf, a.stage, res, logs / f"{name}-%j.out", array=False)}
    if not dry_run:
        logs.mkdir(parents=True, exist_ok=True)  # Slurm does not create it: the job would fail to launch
    paths = {}
    for role, text in texts.items():
        path = folder / (f"{name}.sbatch" if role == "main" else f"{name}.{role}.sbatch")
        if not dry_run:
            atomic_write_text(path, text)
        paths[role] = path
    return paths


def _log_of(script: Path) -> str:
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH --output="):
            return line.split("=", 1)[1]
    return ""


def _submit(wf: Workflow, state: Any, st: Any, a: _Action, scripts: dict[str, Path], after: list[str],
            dry_run: bool, echo: Echo) -> list[str]:
    from workflows import engine

    name = a.stage.name
    dep = f" --dependency=afterok:{':'.join(after)}" if after else ""
    if dry_run:
        for role, path in scripts.items():
            arr = f" --array={_ranges(a.todo)}" if role == "array" else ""
            echo(f"  would run: sbatch{arr}{dep} {path}")
        return []
    rec = state.record(name)
    if a.fresh:
        changed = (stage_plan._what_changed(rec, st.fingerprint, st.inputs, a.stage) if "config" in rec
                   else st.reason)
        engine.keep_partial_work(a.stage, "forced (--force)" if name in a.forced else changed)
        engine._clear_output(a.stage, owned=bool(rec) and rec.get("out") == str(a.stage.out))
        shutil.rmtree(marker_dir(wf, name), ignore_errors=True)
    else:
        engine._clear_output_leftovers(a.stage)
    jobs: list[dict[str, Any]] = []
    if "array" in scripts and a.todo:
        job = slurm.sbatch(scripts["array"], array=_ranges(a.todo), after=after, stage=name)
        jobs.append({"id": job, "role": "array", "tasks": a.todo, "log": _log_of(scripts["array"])})
    if "finalize" in scripts:
        fin_after = [jobs[0]["id"]] if jobs else after
        job = slurm.sbatch(scripts["finalize"], after=fin_after, stage=name)
        jobs.append({"id": job, "role": "finalize", "log": _log_of(scripts["finalize"])})
    if "main" in scripts:
        job = slurm.sbatch(scripts["main"], after=after, stage=name)
        jobs.append({"id": job, "role": "job", "log": _log_of(scripts["main"])})
    state.stages[name] = {"state": "slurm", "fingerprint": st.fingerprint,
                          "config": fingerprints.effective_values(a.stage), "inputs": st.inputs,
                          "config_fp": _config_fp(a.stage, state.hash_cache), "out": str(a.stage.out),
                          "submitted": time.time(), "jobs": jobs, "tasks": a.tasks}
    state.save()  # after each stage: a failure further on still leaves these jobs recorded
    parts = [f"array job {j['id']} (tasks {_ranges(j['tasks'])} of {a.tasks})" if j["role"] == "array" else
             f"{'finalize ' if j['role'] == 'finalize' else ''}job {j['id']}" for j in jobs]
    echo(f"  submitted {', then '.join(parts)}" + (f", after {', '.join(after)}" if after else "") +
         f"; log {jobs[0]['log']}")
    return [j["id"] for j in jobs]


def _ranges(tasks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, i = [], 0
    while i < len(tasks):
        j = i
        while j + 1 < len(tasks) and tasks[j + 1] == tasks[j] + 1:
            j += 1
        out.append(str(tasks[i]) if i == j else f"{tasks[i]}-{tasks[j]}")
        i = j + 1
    return ",".join(out)


# ---------------------------------------------------------------- cancel

def cancel_workflow(wf: Workflow, echo: Echo = print) -> list[str]:
    """scancel the jobs this workflow's state file records that are still pending or running."""
    state = state_file.State(wf)
    statuses = stage_plan.plan(wf, state)
    ids = sorted({j.split("_")[0] for st in statuses for j in st.live_jobs}, key=int)
    if not ids:
        echo(f"workflow {wf.name}: no pending or running Slurm jobs")
        return []
    slurm.scancel(ids)
    for st in statuses:
        if st.live_jobs:
            echo(f"  {st.stage.name}: cancelled job(s) {st.jobs}")
    echo(f"workflow {wf.name}: cancelled {len(ids)} job(s): {', '.join(ids)}")
    return ids


# ---------------------------------------------------------------- the job side

def run_stage_job(wf: Workflow, name: str, *, task: int | None = None, tasks: int | None = None,
                  finalize: bool = False, write_config: bool = False, record: bool = False) -> None:
    """What one Slurm job of a stage does (`graft run-stage`); see the module docstring."""
    import os

    from workflows import engine

    import signal

    def _on_sigterm(signum, frame):  # Slurm's time limit or scancel: leave a failed marker, then exit
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _on_sigterm)
    stage = wf.stage(name)
    label = f"task-{task}" if task is not None else ("finalize" if finalize else "job")
    marker = marker_dir(wf, name) / f"{label}.json"
    started = time.time()
    job = {"job": os.environ.get("SLURM_JOB_ID"), "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
           "host": os.uname().nodename, "started": started}
    try:
        if write_config:
            from workflows.launch import LAUNCHERS

            cfg = engine._stage_config(wf, stage)
            cfg.progress = False  # a log file, not a terminal
            LAUNCHERS[stage.kind.name](cfg, stage.launch, wf.home, stage.name)
            return
        if not record:
            cfg = engine._stage_config(wf, stage)
            if hasattr(cfg, "progress"):
                cfg.progress = False  # a log file, not a terminal
            if task is not None:
                if not 0 <= task < (tasks or 0):
                    raise GraftError(f"--task {task} is outside [0, --tasks {tasks})")
                cfg.shard_index, cfg.num_shards = task, tasks
            stage.kind.fn()(cfg)
        if task is None:
            if not is_complete(stage.out):
                raise GraftError(f"stage {name!r} ended without writing {stage.out}/manifest.json")
            first = [_marker(wf, name, p.stem).get("started") for p in marker_dir(wf, name).glob("task-*.json")]
            fp, inputs = fingerprints.fingerprint(stage, fingerprints.upstream_ids(wf, stage),
                                                  dict(state_file.State(wf).hash_cache))
            engine.record_output(wf, stage, fp, inputs, min([t for t in first if t] + [started]),
                                 slurm_job=job["job"])
        atomic_write_json(marker, {"state": "completed", **job, "finished": time.time()})
    except BaseException as e:
        err = ("interrupted (SIGTERM: time limit or scancel)" if isinstance(e, SystemExit) else
               "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}")
        atomic_write_json(marker, {"state": "failed", "error": err.splitlines()[0][:500], **job,
                                   "finished": time.time()})
        raise
