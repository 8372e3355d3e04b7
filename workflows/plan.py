"""Every stage's state as of now (done, stale, pending, failed, running, submitted), without running anything."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workflows.fingerprints import _volatile, _workflow_section, effective_values, fingerprint, upstream_ids
from workflows.spec import Stage, Workflow
from workflows.state import State, _pid_alive


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
