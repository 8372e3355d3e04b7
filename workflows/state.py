"""A workflow's state file and its lock (see workflows/engine.py for how they are used).

The state file `{runs}/{name}/.graft-state.json` records, per stage, running/failed/done with the
fingerprint, pid and error, and caches input-file hashes. The lock `{runs}/{name}/.graft-lock` keeps a
second `graft run` of the same workflow out; one left by a dead process is taken over.
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from typing import Any, Iterator

from common.errors import GraftError
from common.io import atomic_write_json, read_json
from workflows.spec import Workflow

STATE_FILE = ".graft-state.json"
LOCK_FILE = ".graft-lock"


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
