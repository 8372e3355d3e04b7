"""`graft run --executor slurm`, `graft status` and `graft cancel` against a real one-node Slurm cluster
(tests/slurm/cluster.sh; .ci/run installs slurm-wlm and munge). Where Slurm cannot be had, the tests
that need it are skipped with the reason.

The stages below are referenced as `kind = "test_workflow_slurm:NAME"`; the jobs find this module
through PYTHONPATH, which sbatch passes on with the rest of the environment.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.errors import GraftError
from common.io import read_manifest, write_manifest
from workflows.commands import status_rows
from workflows.spec import load_workflow

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
TERMINAL = {"done", "failed", "cancelled", "timeout"}


# ---------------------------------------------------------------- test stages

@dataclass
class FlakyConfig:
    """Write items 0..n_items-1 split over shards; shard `fail_shard` fails on its first attempt."""

    out: str
    n_items: int = 6
    fail_shard: int = -1
    shard_index: int = 0
    num_shards: int = 1


def flaky_items(cfg: FlakyConfig) -> Path:
    out = Path(cfg.out)
    (out / "items").mkdir(parents=True, exist_ok=True)
    # The fault is outside the config (a file in the stage's own folder), like a node that fails once.
    if cfg.shard_index == cfg.fail_shard and not (out / ".failed-once").exists():
        (out / ".failed-once").touch()
        raise RuntimeError(f"simulated node fault in shard {cfg.shard_index}")
    for i in range(cfg.shard_index, cfg.n_items, cfg.num_shards):
        if not (out / "items" / f"{i}.txt").exists():  # done by an earlier task: skipped, as prepare does
            (out / "items" / f"{i}.txt").write_text(f"item {i} by shard {cfg.shard_index}\n")
    if all((out / "items" / f"{i}.txt").exists() for i in range(cfg.n_items)):
        write_manifest(out, stage="flaky", config=cfg, counts={"items": cfg.n_items})
    return out


flaky_items.graft_array = True
flaky_items.graft_resumable = True


@dataclass
class NoteConfig:
    """Write `text` (and the item count of `items`, when given) to out/note.txt; sleep first."""

    out: str
    text: str = ""
    items: str = ""
    sleep_s: float = 0.0


def note(cfg: NoteConfig) -> Path:
    time.sleep(cfg.sleep_s)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(list(Path(cfg.items, "items").glob("*.txt"))) if cfg.items else 0
    (out / "note.txt").write_text(f"{cfg.text} {n}\n")
    write_manifest(out, stage="note", config=cfg, counts={"items": n})
    return out


# ---------------------------------------------------------------- the cluster

def _start_cluster() -> str | None:
    """None when a cluster answers; otherwise why not."""
    if os.environ.get("SLURM_CONF") and shutil.which("scontrol"):
        if subprocess.run(["scontrol", "ping"], capture_output=True).returncode == 0:
            return None
    if not shutil.which("slurmctld"):
        return "Slurm is not installed (slurmctld not found). Fix: apt-get install -y slurm-wlm munge (.ci/run does)"
    if os.geteuid() != 0:
        return "starting the test cluster needs root (tests/slurm/cluster.sh)"
    proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return f"tests/slurm/cluster.sh start failed: {proc.stderr.strip()[-500:]}"
    os.environ["SLURM_CONF"] = proc.stdout.strip().split("=", 1)[1]
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    why = _start_cluster()
    if why:
        pytest.skip(f"no Slurm cluster: {why}")
    yield os.environ["SLURM_CONF"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO), env.get("PYTHONPATH", "")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def graft(cwd: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", *args], cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"graft {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def status(cwd: Path) -> dict[str, dict]:
    rows = json.loads(graft(cwd, "status", "wf.toml", "--json").stdout)
    return {r["stage"]: r for r in rows}


def wait_until_settled(cwd: Path, timeout: float = 240) -> dict[str, dict]:
    """Poll `graft status` until no stage is pending or running in Slurm."""
    deadline = time.time() + timeout
    while True:
        rows = status(cwd)
        if all(r["state"] in TERMINAL or not r["jobs"] for r in rows.values()):
            return rows
        if time.time() > deadline:
            raise AssertionError(f"jobs still queued after {timeout}s: {rows}")
        time.sleep(1)


def state_records(cwd: Path, name: str = "t") -> dict:
    return json.loads((cwd / "runs" / name / ".graft-state.json").read_text())["stages"]


def write_workflow(cwd: Path, body: str) -> Path:
    cwd.mkdir(parents=True, exist_ok=True)
    path = cwd / "wf.toml"
    path.write_text(textwrap.dedent(body).lstrip())
    return path


PIPELINE = """
    [workflow]
    name = "t"
    runs = "runs"

    [slurm]
    cpus_per_task = 1
    time = "00:10:00"

    [slurm.prep_all]
    tasks = 3

    [corpora]
    kind = "demo.corpora"

    [prep_all]
    kind = "corpus.prepare"
    name = "mixed"
    files = ["@corpora/zh_news.jsonl", "@corpora/zh_reviews.jsonl", "@corpora/en_pydoc_train.jsonl"]
    tokenizer = "@corpora/base_tokenizer.model"
    block_size = 128

    [prep_dev]
    kind = "corpus.prepare"
    name = "dev"
    files = ["@corpora/zh_news_dev.jsonl"]
    tokenizer = "@corpora/base_tokenizer.model"
    block_size = 128

    [mix]
    kind = "corpus.mix"
    spec = "1:{@prep_all}, 0.5:{@prep_dev}"
    """

# What differs between two runs of the same stage by design: times, paths under another folder, the
# command line, fingerprints and ids derived from them (`rerun` hashes the upstream manifests, which
# hold times), and which array task happened to finish.
_RUN_SPECIFIC = {"started", "finished", "duration_s", "cpu_s", "elapsed_s", "argv", "command", "workflow",
                 "shard_index", "num_shards", "progress", "host", "python", "versions", "slurm_job", "rerun"}


def _normalised(obj, root: str):
    if isinstance(obj, dict):
        return {k: _normalised(v, root) for k, v in obj.items() if k not in _RUN_SPECIFIC}
    if isinstance(obj, list):
        return [_normalised(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(root, "<root>")
    return obj


def assert_same_outputs(a: Path, b: Path, stages: list[str]) -> int:
    """Every data file byte for byte; JSON files equal but for run-specific keys. Returns files compared."""
    compared = 0
    for stage in stages:
        fa, fb = a / "runs" / "t" / stage, b / "runs" / "t" / stage
        names = sorted(p.relative_to(fa) for p in fa.rglob("*") if p.is_file())
        assert names == sorted(p.relative_to(fb) for p in fb.rglob("*") if p.is_file()), stage
        for rel in names:
            if rel.parts[0] == "completions":
                continue  # a marker holding the time it was written
            if rel.suffix == ".json":
                ja = _normalised(json.loads((fa / rel).read_text()), str(a))
                jb = _normalised(json.loads((fb / rel).read_text()), str(b))
                assert ja == jb, f"{stage}/{rel}"
            else:
                assert (fa / rel).read_bytes() == (fb / rel).read_bytes(), f"{stage}/{rel} differs"
            compared += 1
    return compared


# ---------------------------------------------------------------- tests

def test_pipeline_through_slurm_equals_local_run(slurm_cluster, tmp_path):
    a, b = tmp_path / "slurm", tmp_path / "local"
    write_workflow(a, PIPELINE)
    write_workflow(b, PIPELINE)

    out = graft(a, "run", "wf.toml", "--executor", "slurm").stdout
    # One `graft run` submits the whole chain and returns before the jobs have finished.
    recs = state_records(a)
    assert {n: r["state"] for n, r in recs.items()} == dict.fromkeys(["corpora", "prep_all", "prep_dev", "mix"], "slurm")
    array, finalize = recs["prep_all"]["jobs"]
    assert (array["role"], array["tasks"], finalize["role"]) == ("array", [0, 1, 2], "finalize")
    assert [j["role"] for j in recs["prep_dev"]["jobs"]] == ["job"]  # one input file: no array
    corpora_job = recs["corpora"]["jobs"][0]["id"]
    assert f"array job {array['id']} (tasks 0-2 of 3), then finalize job {finalize['id']}, after {corpora_job}" in out
    mix_after = sorted([array["id"], finalize["id"], recs["prep_dev"]["jobs"][0]["id"]], key=int)
    assert f"after {', '.join(mix_after)}" in out
    early = status(a)
    assert early["mix"]["state"] in ("pending", "running") and early["mix"]["jobs"] == recs["mix"]["jobs"][0]["id"]

    rows = wait_until_settled(a)
    assert {n: r["state"] for n, r in rows.items()} == dict.fromkeys(rows, "done"), rows
    assert rows["prep_all"]["jobs"] == f"{array['id']}_[0-2],{finalize['id']}"
    for t in range(3):  # each task ran its own shard group, in its own job
        log = a / "runs/t/slurm/logs" / f"prep_all-{array['id']}_{t}.out"
        assert "this task: 1" in log.read_text()
    # Nothing left to do: the same command submits nothing.
    again = graft(a, "run", "wf.toml", "--executor", "slurm").stdout
    assert "nothing to submit" in again and "submitted" not in again.replace("nothing to submit", "")

    graft(b, "run", "wf.toml")
    assert assert_same_outputs(a, b, ["corpora", "prep_all", "prep_dev", "mix"]) > 20
    # The local executor sees the Slurm run as done.
    assert "4 stage(s)" not in graft(a, "run", "wf.toml").stdout
    # A stage whose jobs completed, then whose settings changed, is stale like any other.
    wf = a / "wf.toml"
    wf.write_text(wf.read_text().replace("0.5:{@prep_dev}", "1:{@prep_dev}"))
    rows = status(a)
    assert rows["mix"]["state"] == "stale" and rows["mix"]["why"] == "config changed: spec"
    assert [rows[s]["state"] for s in ("corpora", "prep_all", "prep_dev")] == ["done"] * 3


FLAKY = """
    [workflow]
    name = "t"
    runs = "runs"

    [slurm]
    cpus_per_task = 1

    [slurm.items]
    tasks = 3

    [first]
    kind = "test_workflow_slurm:note"
    text = "first"

    [items]
    kind = "test_workflow_slurm:flaky_items"
    n_items = 6
    fail_shard = 1
    after = ["first"]

    [last]
    kind = "test_workflow_slurm:note"
    text = "last"
    items = "@items"
    """


def test_failed_task_shows_with_its_log_and_rerun_resubmits_only_it_and_dependents(slurm_cluster, tmp_path):
    a = tmp_path / "w"
    write_workflow(a, FLAKY)
    graft(a, "run", "wf.toml", "--executor", "slurm")
    first = state_records(a)
    rows = wait_until_settled(a)
    assert rows["first"]["state"] == "done"
    assert rows["items"]["state"] == "failed"
    array_id = first["items"]["jobs"][0]["id"]
    assert f"job {array_id}_1 failed" in rows["items"]["why"]
    log = Path(rows["items"]["log"])
    assert log.name == f"items-{array_id}_1.out" and "simulated node fault in shard 1" in log.read_text()
    assert rows["last"]["state"] == "cancelled" and "DependencyNeverSatisfied" in rows["last"]["why"]
    text = graft(a, "status", "wf.toml").stdout
    assert f"log: {log}" in text and "failed" in text and "cancelled" in text
    # Once Slurm has forgotten the jobs (no accounting storage, past MinJobAge), their markers tell.
    state_file = a / "runs/t/.graft-state.json"
    saved = state_file.read_text()
    forgotten = json.loads(saved)
    for j in forgotten["stages"]["items"]["jobs"]:
        j["id"] = str(10**7 + int(j["id"]))  # ids this cluster never gave out
    state_file.write_text(json.dumps(forgotten))
    row = status(a)["items"]
    assert row["state"] == "failed" and "RuntimeError: simulated node fault in shard 1" in row["why"]
    state_file.write_text(saved)

    out = graft(a, "run", "wf.toml", "--executor", "slurm").stdout
    second = state_records(a)
    assert second["first"] == first["first"]  # done: not submitted again
    new_array, new_finalize = second["items"]["jobs"]
    assert new_array["tasks"] == [1] and new_finalize["role"] == "finalize"  # only the failed task
    assert int(new_array["id"]) > int(array_id)
    assert "resubmitting what is not complete" in out and "tasks 1 of 3" in out
    assert second["last"]["jobs"][0]["id"] != first["last"]["jobs"][0]["id"]

    rows = wait_until_settled(a)
    assert {n: r["state"] for n, r in rows.items()} == dict.fromkeys(rows, "done"), rows
    items = a / "runs/t/items/items"
    by_shard = {p.name: p.read_text() for p in items.iterdir()}
    assert by_shard == {f"{i}.txt": f"item {i} by shard {i % 3}\n" for i in range(6)}
    markers = a / "runs/t/slurm/markers/items"
    ran_in = {t: json.loads((markers / f"task-{t}.json").read_text())["job"] for t in range(3)}
    # Tasks 0 and 2 kept their first run (array task ids are job ids of their own in Slurm).
    assert ran_in[1] != ran_in[0] and ran_in[1] != ran_in[2]
    assert (a / "runs/t/last/note.txt").read_text() == "last 6\n"


SLEEPY = """
    [workflow]
    name = "t"
    runs = "runs"

    [slurm]
    cpus_per_task = 1

    [slow]
    kind = "test_workflow_slurm:note"
    text = "slow"
    sleep_s = 120

    [after_slow]
    kind = "test_workflow_slurm:note"
    text = "after"
    after = ["slow"]
    """


def test_no_double_submission_and_cancel_touches_only_the_workflows_jobs(slurm_cluster, tmp_path):
    a = tmp_path / "w"
    write_workflow(a, SLEEPY)
    foreign = subprocess.run(["sbatch", "--parsable", "--wrap", "sleep 300", f"--output={tmp_path}/f.out"],
                             capture_output=True, text=True, check=True).stdout.strip()
    try:
        graft(a, "run", "wf.toml", "--executor", "slurm")
        recs = state_records(a)
        deadline = time.time() + 180  # other jobs may hold the node's CPUs for a while
        while status(a)["slow"]["state"] != "running":
            assert time.time() < deadline, status(a)
            time.sleep(1)
        again = graft(a, "run", "wf.toml", "--executor", "slurm").stdout
        assert "already running in Slurm" in again and "already pending in Slurm" in again
        assert state_records(a) == recs  # nothing submitted twice

        out = graft(a, "cancel", "wf.toml").stdout
        ours = [recs["slow"]["jobs"][0]["id"], recs["after_slow"]["jobs"][0]["id"]]
        assert f"cancelled 2 job(s): {', '.join(ours)}" in out
        queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
        assert foreign in queued and not set(ours) & set(queued)
        rows = wait_until_settled(a, timeout=60)
        assert rows["slow"]["state"] == "cancelled" and rows["after_slow"]["state"] == "cancelled"
        assert "no pending or running Slurm jobs" in graft(a, "cancel", "wf.toml").stdout
    finally:
        subprocess.run(["scancel", foreign], check=False)


def test_train_stage_runs_as_a_slurm_job_under_accelerate(slurm_cluster, tmp_path):
    """A `launch.mode = "slurm"` train stage, run by the local executor: submitted for real, tracked by
    its job id, run by srun + accelerate launch (the test cluster's GPUs are count-only, so the job
    trains on the CPU), recorded by the job; the next `graft run` goes on with the stages after it."""
    from tiny_continual import tiny_workspace

    ws = tiny_workspace(tmp_path / "ws")
    a = tmp_path / "w"
    write_workflow(a, f"""
        [workflow]
        name = "t"
        runs = "runs"

        [train]
        kind = "continual.train"
        model = "{ws['base']}"
        train_data = "{ws['data']}"
        lora_r = 8
        lora_alpha = 16
        micro_batch_size = 2
        max_steps = 4
        eval_every = 2
        save_every = 2

        [train.launch]
        mode = "slurm"
        config = "ddp"
        gpus_per_node = 1
        cpus_per_task = 2
        time = "00:15:00"

        [after]
        kind = "test_workflow_slurm:note"
        text = "after"
        after = ["train"]
        """)
    out = graft(a, "run", "wf.toml").stdout  # submits train, then stops: `after` needs its output
    job = state_records(a)["train"]["jobs"][0]["id"]
    assert f"submitted job {job}" in out and f"once job {job} has finished" in out
    assert "after" not in state_records(a)
    script = (a / "runs/t/slurm/train.sbatch").read_text()
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH --time=00:15:00" in script
    assert "srun --kill-on-bad-exit=1" in script and "accelerate launch" in script
    if status(a)["train"]["state"] in ("pending", "running"):
        assert "waiting for its Slurm job" in graft(a, "run", "wf.toml").stdout

    rows = wait_until_settled(a, timeout=300)
    log = a / f"runs/t/slurm/logs/train-{job}.out"
    assert rows["train"]["state"] == "done", log.read_text()[-3000:]
    assert read_manifest(a / "runs/t/train")["workflow"]["slurm_job"] == job
    assert "done: adapter in" in log.read_text()
    metrics = (a / "runs/t/train/metrics.csv").read_text().splitlines()
    assert metrics[-1].split(",")[0] == "4"
    out = graft(a, "run", "wf.toml").stdout
    assert "train: skipped, unchanged" in out and "after: done" in out


def test_time_limit_shows_as_timeout_with_its_log(slurm_cluster, tmp_path):
    a = tmp_path / "w"
    write_workflow(a, SLEEPY.replace("sleep_s = 120", "sleep_s = 600") + '\n[slurm.slow]\ntime = "00:01:00"\n')
    graft(a, "run", "wf.toml", "--executor", "slurm")
    job = state_records(a)["slow"]["jobs"][0]["id"]
    rows = wait_until_settled(a, timeout=240)  # Slurm enforces limits every 30 s, so 60-120 s
    assert rows["slow"]["state"] == "timeout" and f"job {job} timeout (TimeLimit)" in rows["slow"]["why"]
    assert rows["slow"]["log"].endswith(f"slow-{job}.out")
    assert rows["after_slow"]["state"] == "cancelled"
    marker = json.loads((a / "runs/t/slurm/markers/slow/job.json").read_text())
    assert marker["state"] == "failed" and "SIGTERM" in marker["error"]


def test_unknown_partition_passes_slurms_message_with_the_stage(slurm_cluster, tmp_path):
    a = tmp_path / "w"
    write_workflow(a, FLAKY + '\n[slurm.last]\npartition = "nosuch"\n')
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    proc = graft(a, "run", "wf.toml", "--executor", "slurm", check=False)
    assert proc.returncode == 2
    assert "stage 'last': sbatch refused" in proc.stderr
    assert "invalid partition specified: nosuch" in proc.stderr  # Slurm's own words
    # The stages before it were not queued either: Slurm checked every job before any was submitted.
    assert not (a / "runs/t/.graft-state.json").exists() or state_records(a) == {}
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert set(after) <= set(before)


def test_no_sbatch_on_path_says_what_to_install(tmp_path):
    a = tmp_path / "w"
    write_workflow(a, FLAKY)
    env = _env()
    env["PATH"] = str(Path(sys.executable).parent)  # the venv only: no Slurm commands
    if shutil.which("sbatch", path=env["PATH"]):
        pytest.skip("sbatch is inside the venv's bin folder")
    proc = graft(a, "run", "wf.toml", "--executor", "slurm", check=False, env=env)
    assert proc.returncode == 2
    assert "`sbatch` is not on PATH" in proc.stderr and "apt-get install slurm-client" in proc.stderr
    assert "use the local executor" in proc.stderr


def test_slurm_table_errors_at_load_time(tmp_path):
    bad = write_workflow(tmp_path, """
        [workflow]
        name = "t"

        [slurm]
        partion = "gpu"
        cpus_per_task = "many"

        [slurm.nosuch]
        time = "1:00:00"

        [slurm.first]
        tasks = 4

        [slurm.train]
        gpus_per_node = 0

        [first]
        kind = "test_workflow_slurm:note"

        [train]
        kind = "continual.train"
        model = "m"
        train_data = "d"
        """)
    with pytest.raises(GraftError) as e:
        load_workflow(bad)
    msg = str(e.value)
    assert "[slurm] unknown key 'partion' (did you mean 'partition'?)" in msg
    assert "[slurm] key 'cpus_per_task': expected int, got string 'many'" in msg
    assert "[slurm.nosuch] names no stage" in msg
    assert "[slurm.first] tasks = 4: stage kind 'test_workflow_slurm:note' does not run as a job array" in msg
    assert ("[slurm.train] stage 'train' (continual.train) needs GPUs, but gpus_per_node = 0. Fix: set "
            "gpus_per_node in [train.launch] or [slurm.train]") in msg


def test_demo_plans_its_slurm_jobs(tmp_path):
    """The README's `graft run workflows/demo.toml --executor slurm --to mix`, as a dry run."""
    out = graft(tmp_path, "run", str(REPO / "workflows" / "demo.toml"), "--runs", str(tmp_path / "runs"),
                "--executor", "slurm", "--to", "mix", "--dry-run").stdout
    names = [s.name for s in load_workflow(REPO / "workflows" / "demo.toml", runs=str(tmp_path / "runs")).stages]
    upto = names[:names.index("mix") + 1]
    # one plain job per stage up to mix (prep_zh and prep_en included), each with its own script; nothing after
    submitted = [ln.rsplit("/", 1)[1] for ln in out.splitlines() if "would run: sbatch" in ln]
    assert submitted == [f"{n}.sbatch" for n in upto]
    assert f"[{len(upto)}/{len(names)}] mix: never run; submitting" in out and "/train.sbatch" not in out


def test_chinese_mixtral_recipe_plans_its_slurm_jobs(tmp_path):
    """The shipped recipe's [slurm] resources, as a dry run prints them (nothing is submitted)."""
    wf = load_workflow(REPO / "workflows" / "chinese-mixtral.toml", runs=str(tmp_path / "runs"))
    from workflows.slurm import stage_resources

    res = {s.name: stage_resources(s, wf.slurm) for s in wf.stages}
    assert (res["train"].nodes, res["train"].gpus_per_node) == (1, 8)
    assert res["train"].partition == "gpu" and res["vocab_train"].partition == "cpu"
    assert res["prep_skypile_2022"].cpus_per_task == 16
    proc = graft(tmp_path, "run", str(REPO / "workflows" / "chinese-mixtral.toml"), "--runs", str(tmp_path / "runs"),
                 "--executor", "slurm", "--dry-run")
    out = proc.stdout
    assert "would run: sbatch" in out and "train.sbatch" in out
    assert not (tmp_path / "runs" / "chinese-mixtral" / "slurm").exists()  # a dry run writes no script
