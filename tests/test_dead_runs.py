"""A run killed with SIGKILL while it holds the `feature_store` pool slot must not block every
later run: the next backfill releases the slot of the dead run and converges."""

import json
import os
import signal
import subprocess
import sys
import time

import dagster as dg

from llm_twin_features import cli
from llm_twin_features.dead_runs import PID_TAG

from .conftest import SAMPLE_CORPUS

CLI = [sys.executable, "-m", "llm_twin_features.cli"]


def test_backfill_after_a_killed_run_releases_its_pool_slot(data_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(cli.REPO_DAGSTER_YAML.read_text())  # pool limit 1
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
