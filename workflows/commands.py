"""`graft run`, `graft status`, `graft cancel`: run a workflow TOML stage by stage (here or as Slurm
jobs), show where it stands, cancel its Slurm jobs; `graft run-stage` is what each Slurm job runs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.cli import Groups
from common.io import MANIFEST, is_complete

RUN_HELP = """\
Run a workflow: one TOML table per stage, run in file order.

A stage whose config and inputs are unchanged since it finished is skipped. A changed stage
re-runs, and so does everything downstream of it. An interrupted stage resumes (corpus
preparation, training) or restarts cleanly; just run the same command again.
State is kept in {runs}/{name}/.graft-state.json; each stage's manifest.json records its
config, input hashes and duration. See docs/workflows.md for the file format.

Examples:
  graft run workflows/demo.toml                     # the bundled demo (also: plain `graft run`), CPU only
  graft run workflows/demo.toml --to vocab_merge    # only the tokenizer stages
  graft run workflows/demo.toml --force train       # re-run training and what follows
  graft status workflows/demo.toml
  graft run workflows/demo.toml --executor slurm    # submit every stage as chained Slurm jobs, then return
  graft run workflows/demo.toml --executor slurm --dry-run   # show the sbatch commands, submit nothing

With --executor slurm each stage that is not done is submitted with sbatch and chained to the
stages it reads (--dependency=afterok); corpus.prepare stages run as job arrays. Resources come
from the workflow's [slurm] table (see docs/workflows.md). Running the same command after a
failure resubmits only what is not complete; jobs still pending or running are not submitted twice.
"""

STATUS_HELP = """\
Show each stage of a workflow: its state (done, stale, pending, running, failed, cancelled,
timeout), why, its Slurm job ids, its output folder, how long it took and its key figures, and the
log of a failed Slurm job. Stages submitted with --executor slurm are looked up in Slurm (squeue,
and sacct where accounting exists). Runs nothing.
"""

CANCEL_HELP = """\
Cancel (scancel) this workflow's own Slurm jobs that are still pending or running, and no other
job. Their stages then show as cancelled; `graft run --executor slurm` submits them again.
"""


def _resolve_workflow_path(arg: str) -> Path:
    """A path, or the name of a bundled workflow (`demo`, `chinese-mixtral`)."""
    p = Path(arg)
    if p.exists():
        return p
    bundled = Path(__file__).parent / (arg if arg.endswith(".toml") else f"{arg}.toml")
    if not p.suffix and bundled.is_file():
        return bundled
    if bundled.is_file() and p.name == bundled.name:
        return bundled
    return p


def _run(ns: argparse.Namespace) -> None:
    from workflows.engine import run_workflow
    from workflows.spec import load_workflow

    wf = load_workflow(_resolve_workflow_path(ns.workflow), runs=ns.runs)
    if ns.executor == "slurm":
        from workflows.slurm_exec import submit_workflow

        submit_workflow(wf, from_stage=ns.from_stage, to_stage=ns.to_stage, force=ns.force or [],
                        dry_run=ns.dry_run)
        return
    if ns.dry_run:
        from common.errors import GraftError

        raise GraftError("--dry-run goes with --executor slurm. Fix: add --executor slurm, or use "
                         "`graft status` to see what a local run would do")
    run_workflow(wf, from_stage=ns.from_stage, to_stage=ns.to_stage, force=ns.force or [])


def _cancel(ns: argparse.Namespace) -> None:
    from workflows.slurm_exec import cancel_workflow
    from workflows.spec import load_workflow

    cancel_workflow(load_workflow(_resolve_workflow_path(ns.workflow), runs=ns.runs))


def _run_stage(ns: argparse.Namespace) -> None:
    from workflows.slurm_exec import run_stage_job
    from workflows.spec import load_workflow

    wf = load_workflow(_resolve_workflow_path(ns.workflow), runs=ns.runs)
    run_stage_job(wf, ns.stage, task=ns.task, tasks=ns.tasks, finalize=ns.finalize,
                  write_config=ns.write_config, record=ns.record)


def status_rows(workflow: str | Path, runs: str | None = None) -> list[dict]:
    from common.io import read_json
    from workflows.engine import _fmt_s
    from workflows.plan import plan
    from workflows.state import State
    from workflows.figures import key_figures
    from workflows.spec import load_workflow

    wf = load_workflow(_resolve_workflow_path(str(workflow)), runs=runs)
    rows = []
    for st in plan(wf, State(wf)):
        m = read_json(st.stage.out / MANIFEST) if is_complete(st.stage.out) else {}
        rows.append({"stage": st.stage.name, "kind": st.stage.kind.name, "state": st.state, "why": st.reason,
                     "jobs": st.jobs, "log": st.log, "out": str(st.stage.out), "duration_s": st.duration_s,
                     "duration": _fmt_s(st.duration_s), "figures": key_figures(st.stage.kind.name, m) if m else ""})
    return rows


def _status(ns: argparse.Namespace) -> None:
    rows = status_rows(ns.workflow, ns.runs)
    if ns.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    with_jobs = any(r["jobs"] for r in rows)
    cols = [("STAGE", "stage"), ("KIND", "kind"), ("STATE", "state"), *([("SLURM JOBS", "jobs")] if with_jobs else []),
            ("DURATION", "duration"), ("OUTPUT", "out"), ("KEY FIGURES / WHY", "figures")]
    table = [[h for h, _ in cols]]
    for r in rows:
        extra = r["figures"] if r["state"] == "done" else r["why"] + (f"; log: {r['log']}" if r["log"] else "")
        table.append([r["stage"], r["kind"], r["state"], *([r["jobs"] or "-"] if with_jobs else []),
                      r["duration"], r["out"], extra])
    widths = [max(len(row[i]) for row in table) for i in range(len(cols) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    done = sum(r["state"] == "done" for r in rows)
    print(f"\n{done}/{len(rows)} stages done." + ("" if done == len(rows) else
                                                  " Run `graft run` on the same file to bring the rest up to date."))


def register(groups: Groups) -> None:
    top = groups.subparsers(())
    p = top.add_parser("run", help="run a workflow TOML, skipping unchanged stages and resuming interrupted ones",
                       description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", metavar="WORKFLOW.toml", nargs="?", default="demo",
                   help="workflow file, or a bundled name: demo (the default), chinese-mixtral")
    p.add_argument("--from", dest="from_stage", metavar="STAGE",
                   help="start at STAGE; earlier stages are not run and their existing outputs are used")
    p.add_argument("--to", dest="to_stage", metavar="STAGE", help="stop after STAGE")
    p.add_argument("--force", action="append", metavar="STAGE",
                   help="re-run STAGE even if unchanged (and, as a result, everything downstream); repeatable")
    p.add_argument("--runs", metavar="DIR", help="override [workflow] runs: the folder for default stage outputs")
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local: run the stages in this process (default); slurm: submit them as chained "
                        "Slurm jobs (sbatch) and return")
    p.add_argument("--dry-run", action="store_true",
                   help="with --executor slurm: write nothing, submit nothing, print the sbatch commands")
    p.set_defaults(_run=_run)

    s = top.add_parser("status", help="show each stage's state, duration and key figures",
                       description=STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("workflow", metavar="WORKFLOW.toml", nargs="?", default="demo",
                   help="workflow file, or a bundled name: demo (the default), chinese-mixtral")
    s.add_argument("--runs", metavar="DIR", help="as for graft run")
    s.add_argument("--json", action="store_true", help="print the rows as JSON")
    s.set_defaults(_run=_status)

    c = top.add_parser("cancel", help="cancel the workflow's own pending and running Slurm jobs",
                       description=CANCEL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("workflow", metavar="WORKFLOW.toml", help="workflow file, or a bundled name")
    c.add_argument("--runs", metavar="DIR", help="as for graft run")
    c.set_defaults(_run=_cancel)

    j = top.add_parser("run-stage", help="run one stage of a workflow as a Slurm job does (used by job scripts)",
                       description="What each Slurm job of `graft run --executor slurm` runs: one stage, one "
                                   "array task, an array's finalize step, or the train stage's config/record "
                                   "steps. It writes the stage's output and a completion marker, never the "
                                   "workflow's state file.")
    j.add_argument("workflow", metavar="WORKFLOW.toml")
    j.add_argument("--runs", metavar="DIR", help="as for graft run")
    j.add_argument("--stage", required=True, help="the stage to run")
    j.add_argument("--task", type=int, help="array task index ($SLURM_ARRAY_TASK_ID): run shard group TASK")
    j.add_argument("--tasks", type=int, help="number of array tasks (shard groups)")
    j.add_argument("--finalize", action="store_true", help="after the array: finish the stage, record it")
    j.add_argument("--write-config", action="store_true", help="train: write the resolved train config TOML")
    j.add_argument("--record", action="store_true", help="train: record the finished output in its manifest")
    j.set_defaults(_run=_run_stage)
