"""Runs killed outright (SIGKILL, OOM killer, power loss) never release their `feature_store`
pool slot, and every later run would wait for that slot forever. Dagster's daemon frees the
slots of *finished* runs, but cannot tell that a locally launched run's process is gone.

Every run records which process runs it (`owner_tags`, set when its resources start); before
the CLI starts a run, and on each tick of the events sensor, `release_dead_runs` marks runs
whose process is gone as failed and frees their slots, so the next run proceeds and converges
(every stage is idempotent).
"""

from __future__ import annotations

import os
import socket

import dagster as dg

PID_TAG = "llm_twin/pid"
HOST_TAG = "llm_twin/host"


def owner_tags() -> dict[str, str]:
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def _process_gone(run: dg.DagsterRun) -> bool:
    if run.tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in run.tags:
        return False  # not ours to judge: another machine's, or no owner recorded yet
    try:
        os.kill(int(run.tags[PID_TAG]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def release_dead_runs(instance: dg.DagsterInstance, pools: list[str]) -> list[str]:
    """Fails the runs holding (or waiting for) a slot of `pools` whose process is gone, frees
    the slots of those and of finished runs; returns the run ids released."""
    released = []
    storage = instance.event_log_storage
    for pool in pools:
        info = storage.get_concurrency_info(pool)
        for run_id in sorted(info.active_run_ids | info.assigned_run_ids | info.pending_run_ids):
            run = instance.get_run_by_id(run_id)
            if run is not None and not run.is_finished:
                if not _process_gone(run):
                    continue
                instance.report_run_failed(
                    run,
                    f"the process of this run (pid {run.tags[PID_TAG]}) is gone, killed before "
                    f"it could finish; its {pool} pool slot was released so later runs proceed",
                )
            storage.free_concurrency_slots_for_run(run_id)
            released.append(run_id)
    return released
