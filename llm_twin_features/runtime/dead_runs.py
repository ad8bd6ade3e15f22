"""Runs killed outright (SIGKILL, OOM killer, power loss) never release their `feature_store`
pool slot, and every later run would wait for that slot forever. Dagster's daemon frees the
slots of *finished* runs, but cannot tell that a locally launched run's process is gone.

Every run records which process runs it (`owner_tags`, set when its resources start); before
the CLI starts a run, and on each tick of the events sensor, `release_dead_runs` marks runs
whose process is gone as failed and frees their slots, so the next run proceeds and converges
(every stage is idempotent).

A process killed outright is dead, yet `kill(pid, 0)` succeeds until its parent waits for it:
it stays a zombie (state Z), which counts as gone here. So does a pid since taken by another
process: the process's start time is recorded with its pid (Linux, from /proc) and compared.
Without /proc (macOS), psutil tells zombies when it is installed, else `kill(pid, 0)` decides.
The laptop's run launcher also reaps the run processes it starts and fails their runs itself,
and answers the daemon's run monitoring with `process_gone` (run_launcher.py).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the run server's commands read process_state without importing Dagster
    import dagster as dg

PID_TAG = "llm_twin/pid"
HOST_TAG = "llm_twin/host"
START_TAG = "llm_twin/pid_start"  # the process's start time, in clock ticks after boot
PARENT_GRACE_SECONDS = 1.0
PROC = Path("/proc")


def process_state(pid: int) -> tuple[str, str] | None:
    """(state, start time) of process `pid` from /proc/<pid>/stat; None without /proc.
    Raises ProcessLookupError when there is no such process."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        if (PROC / "self" / "stat").exists():
            raise ProcessLookupError(pid) from None
        return None
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return fields[0], fields[19]  # fields 3 (state) and 22 (starttime) of proc(5)


def owner_tags(pid: int | None = None) -> dict[str, str]:
    """The tags that name process `pid` (this one by default) as the one running a run."""
    pid = os.getpid() if pid is None else pid
    tags = {PID_TAG: str(pid), HOST_TAG: socket.gethostname()}
    try:
        stat = process_state(pid)
    except ProcessLookupError:
        stat = None
    if stat is not None:
        tags[START_TAG] = stat[1]
    return tags


def process_gone(run: dg.DagsterRun) -> bool:
    """Whether the process recorded as running `run` (owner_tags) is dead: no such process,
    a zombie, or its pid now another process's. False when it cannot tell."""
    return owner_gone(run.tags)


def owner_gone(tags: Mapping[str, str]) -> bool:
    """Whether the process that `tags` (`owner_tags`, a run's or the run server's) name is
    dead: no such process, a zombie, or its pid now another process's. False when it cannot
    tell."""
    if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
        return False  # not ours to judge: another machine's, or no owner recorded yet
    try:
        pid = int(tags[PID_TAG])
        stat = process_state(pid)
    except ProcessLookupError:
        return True
    except ValueError:
        return False
    if stat is not None:
        state, started = stat
        recorded = tags.get(START_TAG)
        return state in ("Z", "X", "x") or (recorded is not None and recorded != started)
    try:  # no /proc
        import psutil  # a development dependency, not always installed
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def release_dead_runs(
    instance: dg.DagsterInstance, pools: list[str], grace_seconds: float = PARENT_GRACE_SECONDS
) -> list[str]:
    """Fails the runs holding (or waiting for) a slot of `pools` whose process is gone, frees
    the slots of those and of finished runs; returns the run ids released.

    A dead run's process is first left `grace_seconds` to its parent, which reaps it and fails
    the run itself when it can tell (the prestarted launcher at once, the code server within
    half a second): one failure per run, the one that knows how its process ended."""
    storage = instance.event_log_storage
    holders: dict[str, str] = {}  # run id: the first of `pools` it holds or waits for
    for pool in pools:
        info = storage.get_concurrency_info(pool)
        for run_id in sorted(info.active_run_ids | info.assigned_run_ids | info.pending_run_ids):
            holders.setdefault(run_id, pool)
    dead = [run_id for run_id in holders if _unfinished_and_gone(instance, run_id)]
    if dead:
        time.sleep(grace_seconds)
    released = []
    for run_id, pool in holders.items():
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            if run_id not in dead or not process_gone(run):
                continue
            instance.report_run_failed(
                run,
                f"the process of this run (pid {run.tags[PID_TAG]}) is gone, killed before "
                f"it could finish; its {pool} pool slot was released so later runs proceed",
            )
        storage.free_concurrency_slots_for_run(run_id)
        released.append(run_id)
    return released


def _unfinished_and_gone(instance: dg.DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is not None and not run.is_finished and process_gone(run)
