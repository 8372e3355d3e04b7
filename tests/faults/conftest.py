"""Fault-injection suite: one case per fault class, each asserting the exact error or the exact counts.

Every case is marked `@pytest.mark.fault(CLASS, OUTCOME)`:
  OUTCOME "error"   - the run stops with one clear error naming the file/key/output and the fix;
  OUTCOME "resumed" - a re-run resumes, restarts or skips, and its output equals an uninterrupted run's;
  OUTCOME "counted" - the run goes on by policy (--on-corrupt skip), the loss counted and logged;
  OUTCOME "warned"  - the run goes on with a warning that says what could not be checked.
"Lost" (records or work gone without a word) is 0 by construction: a case that loses anything fails.
The end of the run prints the outcome table that README.md's "Reliability" section shows;
test_readme_table.py checks that README's table is this suite's.
"""
from __future__ import annotations

import subprocess
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest

OUTCOMES = ("error", "resumed", "counted", "warned")
_PASSED: dict[str, tuple[str, str]] = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "fault(cls, outcome): a fault-injection case (tests/faults)")


def fault_cases(items) -> list[tuple[str, str, str]]:
    """(test id, fault class, outcome) of every collected fault case."""
    out = []
    for item in items:
        m = item.get_closest_marker("fault")
        if m is not None:
            cls, outcome = m.args
            assert outcome in OUTCOMES, (item.nodeid, outcome)
            out.append((item.nodeid, cls, outcome))
    return out


def outcome_table(cases: list[tuple[str, str, str]]) -> str:
    by_class: dict[str, Counter] = defaultdict(Counter)
    for _, cls, outcome in cases:
        by_class[cls][outcome] += 1
    rows = ["| fault class | tried | clear error | resumed / skipped | counted, went on | warned | lost |",
            "|---|---|---|---|---|---|---|"]
    total = Counter()
    for cls in sorted(by_class):
        c = by_class[cls]
        total.update(c)
        rows.append(f"| {cls} | {sum(c.values())} | {c['error']} | {c['resumed']} | {c['counted']} | {c['warned']} | 0 |")
    rows.append(f"| **all** | **{sum(total.values())}** | **{total['error']}** | **{total['resumed']}** | "
                f"**{total['counted']}** | **{total['warned']}** | **0** |")
    return "\n".join(rows)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    m = item.get_closest_marker("fault")
    if m is not None and rep.when == "call" and rep.passed:
        _PASSED[item.nodeid] = m.args


def pytest_terminal_summary(terminalreporter):
    if _PASSED:
        cases = [(k, *v) for k, v in _PASSED.items()]
        terminalreporter.write_sep("-", f"fault-injection outcomes ({len(cases)} cases passed)")
        terminalreporter.write_line(outcome_table(cases))


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs (root only); yields (mount point, resize(kib)). Skipped, with the reason, elsewhere."""
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the full-disk cases need root")

    def resize(kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(mnt)], check=True)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Mixtral (vocabulary 32,000, hidden 16, 3 shards) with no tokenizer: built in about a second."""
    from demo.tiny import save_tiny_mixtral

    return save_tiny_mixtral(tmp_path_factory.mktemp("faults") / "base", hidden=16, intermediate=32,
                             max_shard_size="600KB")
