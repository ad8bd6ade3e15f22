"""A run killed with SIGKILL while it holds the `feature_store` pool slot must not block every
later run: the next backfill releases the slot of the dead run and converges."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest

from llm_twin_features.cli.common import REPO_DAGSTER_YAML
from llm_twin_features.runtime.dead_runs import HOST_TAG, PID_TAG, release_dead_runs

from ..conftest import SAMPLE_CORPUS

CLI = [sys.executable, "-m", "llm_twin_features.cli"]


def test_backfill_after_a_killed_run_releases_its_pool_slot(data_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(REPO_DAGSTER_YAML.read_text())  # pool limit 1
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    subprocess.run(
        [*CLI, "ingest", "--no-publish", str(SAMPLE_CORPUS)],
        env=env,
        check=True,
        capture_output=True,
    )

    victim = subprocess.Popen(
        [*CLI, "backfill", "--type", "articles"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in victim.stdout:  # kill it while a feature-store step holds the slot
        if "cleaned articles:" in line:
            os.kill(victim.pid, signal.SIGKILL)
            break
    victim.wait(30)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        info = instance.event_log_storage.get_concurrency_info("feature_store")
        assert info.active_run_ids, "the killed run should still hold its slot"
        (dead_run_id,) = info.active_run_ids
        assert instance.get_run_by_id(dead_run_id).tags[PID_TAG] == str(victim.pid)

    started = time.monotonic()
    rerun = subprocess.run(
        [*CLI, "backfill", "--type", "articles"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"released the pool slot of run {dead_run_id}" in rerun.stderr
    assert time.monotonic() - started < 240
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(dead_run_id).status == dg.DagsterRunStatus.FAILURE
        assert not instance.event_log_storage.get_concurrency_info("feature_store").active_run_ids

    audit = subprocess.run(
        [*CLI, "audit", "--type", "articles", "--json"], env=env, capture_output=True, text=True
    )
    assert audit.returncode == 0, audit.stdout
    assert json.loads(audit.stdout)["in_sync"] is True


POOL = "feature_store"


@dg.op
def _noop() -> None:
    pass


@dg.job
def _owned_job():
    _noop()


def _run_holding_the_slot(instance: dg.DagsterInstance, tags: dict[str, str]) -> dg.DagsterRun:
    """A STARTED run holding the one slot of POOL, owned by the process `tags` name."""
    run = instance.create_run_for_job(
        job_def=_owned_job, status=dg.DagsterRunStatus.STARTED, tags=tags
    )
    instance.event_log_storage.set_concurrency_slots(POOL, 1)
    assert instance.event_log_storage.claim_concurrency_slot(POOL, run.run_id, "_noop").is_claimed
    return run


def _released(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    info = instance.event_log_storage.get_concurrency_info(POOL)
    status = instance.get_run_by_id(run.run_id).status
    return status == dg.DagsterRunStatus.FAILURE and run.run_id not in info.active_run_ids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are seen in /proc")
def test_a_run_whose_process_is_a_zombie_is_released():
    """A run process killed outright stays a zombie until its parent waits for it (a launcher
    that does not reap it): `kill(pid, 0)` still succeeds, but the run is dead."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        os.kill(child.pid, signal.SIGKILL)  # not waited for: a zombie under this process
        deadline = time.monotonic() + 30
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the killed child never became a zombie"
            time.sleep(0.05)
        with dg.instance_for_test() as instance:
            live = _run_holding_the_slot(
                instance, {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
            )
            assert release_dead_runs(instance, [POOL]) == []  # this process is alive
            instance.report_run_failed(live)
            instance.event_log_storage.free_concurrency_slots_for_run(live.run_id)

            dead = _run_holding_the_slot(
                instance, {PID_TAG: str(child.pid), HOST_TAG: socket.gethostname()}
            )
            assert release_dead_runs(instance, [POOL]) == [dead.run_id]
            assert _released(instance, dead)
    finally:
        child.wait(30)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="start times are read in /proc")
def test_a_run_whose_pid_was_reused_is_released():
    """The pid recorded for a run now belongs to another process (started later): the run's
    own process is gone."""
    from llm_twin_features.runtime.dead_runs import START_TAG, owner_tags

    with dg.instance_for_test() as instance:
        own = owner_tags()
        assert own[PID_TAG] == str(os.getpid()) and START_TAG in own
        live = _run_holding_the_slot(instance, own)
        assert release_dead_runs(instance, [POOL]) == []
        instance.report_run_failed(live)
        instance.event_log_storage.free_concurrency_slots_for_run(live.run_id)

        reused = _run_holding_the_slot(instance, {**own, START_TAG: str(int(own[START_TAG]) - 1)})
        assert release_dead_runs(instance, [POOL]) == [reused.run_id]
        assert _released(instance, reused)
