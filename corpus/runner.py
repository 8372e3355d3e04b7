"""Run shard jobs in this process or in a pool of worker processes, with one progress bar.

`--workers N` starts N spawned processes (one input file at a time each); each caps its tokenizer
thread pool at `threads` (default: cores // workers) so N workers do not oversubscribe the CPU.
A failing shard (an unreadable file) does not stop the others; failures are returned.
Workers are spawned (not forked), so a Python script that calls prepare/count with workers > 1
must guard its entry point with `if __name__ == "__main__":` (the `graft` command does).
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import queue as queue_mod
import time
from typing import Any, Callable

from common.errors import GraftError
from corpus.shard import ShardJob, set_threads

_QUEUE: Any = None


class Progress:
    """A tqdm bar counting tokens, with documents/s and shards done in the postfix."""

    def __init__(self, desc: str, total_shards: int, enabled: bool = True, unit: str = "tok"):
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit=unit, unit_scale=True, disable=not enabled, dynamic_ncols=True)
        self.t0 = time.time()
        self.docs = 0
        self.shards = 0
        self.total_shards = total_shards
        self.count_docs = unit != "tok"

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.bar.update(docs if self.count_docs else tokens)
        self._postfix()

    def shard_done(self) -> None:
        self.shards += 1
        self._postfix()

    def _postfix(self) -> None:
        dt = max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"docs={self.docs:,} ({self.docs / dt:,.0f} docs/s) "
                                 f"shards={self.shards}/{self.total_shards}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _init_worker(q, threads: int) -> None:
    global _QUEUE
    _QUEUE = q
    set_threads(threads)


def _report(docs: int, tokens: int) -> None:
    _QUEUE.put((docs, tokens))


def _run_in_worker(fn: Callable[[ShardJob, Any], dict], job: ShardJob) -> dict:
    return fn(job, _report)


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def run_jobs(jobs: list[ShardJob], fn: Callable[[ShardJob, Any], dict], *, workers: int = 1, threads: int = 0,
             progress: Progress, on_done: Callable[[ShardJob, dict], None] | None = None
             ) -> tuple[dict[str, dict], dict[str, str]]:
    """Run `fn(job, report)` for every job; returns ({shard_id: result}, {shard_id: error message})."""
    results: dict[str, dict] = {}
    failures: dict[str, str] = {}

    def finished(job: ShardJob, result: dict) -> None:
        if on_done is not None:
            on_done(job, result)
        results[job.shard_id] = result
        progress.shard_done()

    if workers <= 1 or len(jobs) <= 1:
        set_threads(threads)  # only effective before this process's first tokenizer batch
        for job in jobs:
            try:
                finished(job, fn(job, progress.update))
            except GraftError as e:
                failures[job.shard_id] = str(e)
        return results, failures

    ctx = mp.get_context("spawn")  # fork after tokenizers' threads started would disable them
    q = ctx.Queue()
    n = min(workers, len(jobs))
    pool = cf.ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker,
                                  initargs=(q, threads or default_threads(n)))
    try:
        futures = {pool.submit(_run_in_worker, fn, job): job for job in jobs}
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=0.25, return_when=cf.FIRST_COMPLETED)
            _drain(q, progress)
            for fut in done:
                job = futures[fut]
                try:
                    finished(job, fut.result())
                except GraftError as e:
                    failures[job.shard_id] = str(e)
                except cf.process.BrokenProcessPool:
                    raise GraftError(
                        "a worker process died (killed, out of memory, or started from a Python script "
                        "without `if __name__ == \"__main__\":`, which spawned workers need). Fix: guard the "
                        "script's entry point, or use --workers 1; re-run to resume (finished files are kept)") from None
        _drain(q, progress)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results, failures


def _drain(q, progress: Progress) -> None:
    while True:
        try:
            docs, tokens = q.get_nowait()
        except queue_mod.Empty:
            return
        progress.update(docs, tokens)
