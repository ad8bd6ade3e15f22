"""The laptop's run launcher (llm_twin_features/runtime/run_launcher.py) on a real instance:
runs go to a process started ahead of time, the usual code-server launch takes over when that
process cannot run the code as it is now, termination cancels, a run whose process is killed
outright fails and frees its pool slot, and no ready process outlives its launcher; any error on
the way to a ready process (the private Dagster API it uses changed, dagster_private.py) leaves
the run to the code server. The daemon's use of it is exercised by tests/e2e/test_events_e2e.py."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.launcher import WorkerStatus
from dagster._core.origin import JobPythonOrigin
from dagster._core.test_utils import poll_for_finished_run, poll_for_step_start
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import ModuleTarget
from dagster._serdes import serialize_value

from llm_twin_features.cli.common import REPO_DAGSTER_YAML
from llm_twin_features.runtime import dagster_private
from llm_twin_features.runtime.dead_runs import PID_TAG, release_dead_runs
from llm_twin_features.runtime.run_launcher import (
    LAUNCHED_BY_TAG,
    PRESTARTED,
    READY_PROCESSES,
    PrestartedProcessRunLauncher,
    PrestartedRunProcess,
)

MODULE = "prestarted_code_location"
LAUNCHER = {
    "module": "llm_twin_features.runtime.run_launcher",
    "class": "PrestartedProcessRunLauncher",
}


@pytest.fixture
def location(tmp_path, monkeypatch) -> Path:
    """The test code location, copied: tests edit its file."""
    directory = tmp_path / "location"
    directory.mkdir()
    shutil.copy(Path(__file__).with_name(f"{MODULE}.py"), directory / f"{MODULE}.py")
    monkeypatch.setenv("PRESTARTED_JOBS_IMPORTED", str(tmp_path / "imported"))
    return directory


@pytest.fixture
def instance():
    with dg.instance_for_test(overrides={"run_launcher": LAUNCHER}) as instance:
        yield instance


def repository(location: Path) -> ReconstructableRepository:
    return ReconstructableRepository.for_module(MODULE, "defs", working_directory=str(location))


def create_run(instance, location: Path, job_name: str, **kwargs) -> dg.DagsterRun:
    repo = repository(location)
    return instance.create_run_for_job(
        job_def=repo.get_definition().get_job(job_name),
        job_code_origin=JobPythonOrigin(job_name, repo.get_python_origin()),
        **kwargs,
    )


def marker_run(instance, location: Path, pid_file: Path, **kwargs) -> dg.DagsterRun:
    config = {"ops": {"write_pid": {"config": {"path": str(pid_file)}}}}
    return create_run(instance, location, "marker_job", run_config=config, **kwargs)


def ready_pids(launcher: PrestartedProcessRunLauncher) -> list[int]:
    """The processes waiting for a run, the one the next run goes to first."""
    return [process.pid for waiting in launcher._ready.values() for process in waiting]


def ready_pid(launcher: PrestartedProcessRunLauncher) -> int:
    return ready_pids(launcher)[0]


def wait_for_import(marker: Path, pid: int, timeout: float = 120) -> None:
    """Until process `pid` has imported the code location."""
    deadline = time.monotonic() + timeout
    while not (marker.exists() and marker.read_text() == str(pid)):
        assert time.monotonic() < deadline, "the prestarted process never imported the location"
        time.sleep(0.1)


def test_the_laptop_instance_uses_it(tmp_path):
    (tmp_path / "dagster.yaml").write_text(REPO_DAGSTER_YAML.read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert isinstance(instance.run_launcher, PrestartedProcessRunLauncher)


def test_runs_go_to_a_process_started_ahead_of_time(instance, location, tmp_path):
    launcher = instance.run_launcher
    launcher.prestart(repository(location).get_python_origin())
    pids = []
    for number in range(2):
        waiting = ready_pid(launcher)
        run = marker_run(instance, location, tmp_path / f"pid{number}")
        instance.launch_run(run.run_id, workspace=None)  # the usual launch would need one
        if number == 0:  # one started for the next run; no spare beside this one
            assert len(ready_pids(launcher)) == 1
        finished = poll_for_finished_run(instance, run.run_id, timeout=120)
        assert finished.status == dg.DagsterRunStatus.SUCCESS
        assert (tmp_path / f"pid{number}").read_text() == str(waiting)  # it ran the step
        assert finished.tags[LAUNCHED_BY_TAG] == PRESTARTED
        assert finished.tags[PID_TAG] == str(waiting)
        pids.append(waiting)
    assert pids[0] != pids[1]  # the next run's process started when the first run went
    assert psutil.pid_exists(ready_pid(launcher))  # and the one after that waits
    launcher.join(timeout=60)  # its runs' processes ended and were waited for
    assert not any(psutil.pid_exists(pid) for pid in pids)
    # Once a run has ended, a spare is started too: two wait. (Not checked by comparing
    # process start times with the run's end: psutil derives them from the boot time, which
    # the kernel gives in whole seconds, and one such check was 0.3 s off.)
    waiting = ready_pids(launcher)
    assert len(waiting) == READY_PROCESSES and not set(waiting) & set(pids)


def launch_with_a_code_server(instance, location: Path, pid_file: Path) -> dg.DagsterRun:
    """Launches a marker run with a workspace (a code server for the fallback); the finished
    run."""
    target = ModuleTarget(MODULE, "defs", str(location), "prestarted")
    with WorkspaceProcessContext(instance, target) as process_context:
        workspace = process_context.create_request_context()
        remote_job = (
            workspace.get_code_location("prestarted")
            .get_repository("__repository__")
            .get_full_job("marker_job")
        )
        run = marker_run(
            instance, location, pid_file, remote_job_origin=remote_job.get_remote_origin()
        )
        instance.launch_run(run.run_id, workspace)
        return poll_for_finished_run(instance, run.run_id, timeout=120)


@pytest.mark.parametrize("fault", ["code edited", "process killed"])
def test_a_ready_process_that_cannot_run_the_code_leaves_the_run_to_the_code_server(
    instance, location, tmp_path, fault
):
    launcher = instance.run_launcher
    launcher.prestart(repository(location).get_python_origin())
    stale = ready_pid(launcher)
    wait_for_import(tmp_path / "imported", stale)
    if fault == "code edited":  # it would run the old code
        with (location / f"{MODULE}.py").open("a") as source:
            source.write("\n# edited while a process waited with the old code\n")
    else:
        psutil.Process(stale).kill()

    finished = launch_with_a_code_server(instance, location, tmp_path / "pid")
    assert finished.status == dg.DagsterRunStatus.SUCCESS
    assert LAUNCHED_BY_TAG not in finished.tags  # the code server ran it
    assert (tmp_path / "pid").read_text() != str(stale)
    assert not psutil.pid_exists(stale) or psutil.Process(stale).status() == psutil.STATUS_ZOMBIE
    assert ready_pid(launcher) != stale  # a process with the edited code waits


@pytest.mark.parametrize("failing", ["code_location_origin", "execute_run_request"])
def test_an_error_on_the_way_to_the_ready_process_leaves_the_run_to_the_code_server(
    instance, location, tmp_path, monkeypatch, caplog, failing
):
    """As after a Dagster upgrade that changed the private API it uses: reading the run's code
    location, building the run's arguments (ExecuteRunArgs)."""
    launcher = instance.run_launcher
    launcher.prestart(repository(location).get_python_origin())
    waiting = ready_pid(launcher)

    def changed_by_an_upgrade(*args, **kwargs):
        raise TypeError(f"{failing}: changed by a Dagster upgrade")

    monkeypatch.setattr(dagster_private, failing, changed_by_an_upgrade)
    with caplog.at_level(logging.WARNING, logger="llm_twin_features.runtime.run_launcher"):
        finished = launch_with_a_code_server(instance, location, tmp_path / "pid")
    assert finished.status == dg.DagsterRunStatus.SUCCESS
    assert LAUNCHED_BY_TAG not in finished.tags  # the code server ran it
    assert (tmp_path / "pid").read_text() != str(waiting)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{failing}: changed by a Dagster upgrade" in warning.getMessage()
    assert "the code server launches it" in warning.getMessage()
    assert ready_pid(launcher) == waiting  # untouched: it waits on for the next run
    assert psutil.Process(waiting).status() != psutil.STATUS_ZOMBIE


def test_a_ready_process_declines_a_run_it_cannot_read(location):
    """The run worker checks the run's arguments before it takes the run."""
    origin = repository(location).get_python_origin()
    ready = PrestartedRunProcess(sys.executable, serialize_value(origin))
    assert not ready.hand_over("not the arguments of a run")
    assert ready.process.poll() is not None  # gone, and waited for


def test_terminating_a_run_cancels_it(instance, location):
    launcher = instance.run_launcher
    launcher.prestart(repository(location).get_python_origin())
    run = create_run(instance, location, "sleeping_job")
    instance.launch_run(run.run_id, workspace=None)
    poll_for_step_start(instance, run.run_id, timeout=120)
    assert launcher.terminate(run.run_id)
    finished = poll_for_finished_run(instance, run.run_id, timeout=60)
    assert finished.status == dg.DagsterRunStatus.CANCELED


def test_a_ready_process_does_not_outlive_its_launcher(instance, location):
    launcher = instance.run_launcher
    origin = repository(location).get_python_origin()
    launcher.prestart(origin)
    disposed = ready_pid(launcher)
    launcher.dispose()
    assert not psutil.pid_exists(disposed)

    # Its launcher's process dies: the ready process reads the end of its stdin and exits.
    script = textwrap.dedent(
        f"""
        import os, sys
        from llm_twin_features.runtime.run_launcher import PrestartedRunProcess
        ready = PrestartedRunProcess(sys.executable, {serialize_value(origin)!r})
        print(ready.pid, flush=True)
        os._exit(0)
        """
    )
    orphan = int(
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout
    )
    deadline = time.monotonic() + 120
    while psutil.pid_exists(orphan) and psutil.Process(orphan).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the orphaned ready process kept running"
        time.sleep(0.2)


POOLED_LOCATION = """
import time

import dagster as dg


@dg.op(pool="feature_store", config_schema={"seconds": float})
def hold_the_slot(context) -> None:
    time.sleep(context.op_config["seconds"])


@dg.job(executor_def=dg.in_process_executor)
def pooled_job():
    hold_the_slot()


defs = dg.Definitions(jobs=[pooled_job])
"""


def test_a_run_process_killed_outright_fails_its_run_and_frees_its_slot(tmp_path):
    """SIGKILL of a run's process while the launcher's process lives on and has not waited for
    it: the run must not stay STARTED holding its pool slot (every later run would wait)."""
    directory = tmp_path / "pooled"
    directory.mkdir()
    (directory / "pooled_location.py").write_text(POOLED_LOCATION)
    repo = ReconstructableRepository.for_module(
        "pooled_location", "defs", working_directory=str(directory)
    )
    overrides = {"run_launcher": LAUNCHER, "concurrency": {"pools": {"default_limit": 1}}}
    with dg.instance_for_test(overrides=overrides) as instance:

        def pooled_run(seconds: float) -> dg.DagsterRun:
            return instance.create_run_for_job(
                job_def=repo.get_definition().get_job("pooled_job"),
                job_code_origin=JobPythonOrigin("pooled_job", repo.get_python_origin()),
                run_config={"ops": {"hold_the_slot": {"config": {"seconds": seconds}}}},
            )

        def slot_holders() -> set[str]:
            return instance.event_log_storage.get_concurrency_info("feature_store").active_run_ids

        instance.run_launcher.prestart(repo.get_python_origin())
        victim = pooled_run(600)
        instance.launch_run(victim.run_id, workspace=None)
        deadline = time.monotonic() + 120
        while victim.run_id not in slot_holders():
            assert time.monotonic() < deadline, "the run never took its pool slot"
            time.sleep(0.1)
        started = instance.get_run_by_id(victim.run_id)
        assert started.tags[LAUNCHED_BY_TAG] == PRESTARTED
        pid = int(started.tags[PID_TAG])
        health = instance.run_launcher.check_run_worker_health  # the daemon's run monitoring
        assert health(started).status == WorkerStatus.RUNNING

        os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        killed = next_tick = time.monotonic()
        while (
            instance.get_run_by_id(victim.run_id).status != dg.DagsterRunStatus.FAILURE
            or victim.run_id in slot_holders()
        ):
            assert time.monotonic() - killed < 30, "the killed run still holds its slot"
            if time.monotonic() >= next_tick:  # what each tick of the events sensor does
                release_dead_runs(instance, ["feature_store"])
                next_tick += 1.0
            time.sleep(0.05)
        released = time.monotonic() - killed
        assert not psutil.pid_exists(pid)  # waited for: no zombie left behind
        failures = instance.get_records_for_run(
            victim.run_id, of_type=dg.DagsterEventType.RUN_FAILURE
        ).records
        (failure,) = failures  # one failure: the launcher's, which knows how it ended
        assert "was killed by SIGKILL" in failure.event_log_entry.message
        assert health(started).status == WorkerStatus.FAILED

        retry = pooled_run(0)  # what the run retry does: it gets the slot and converges
        instance.launch_run(retry.run_id, workspace=None)
        finished = poll_for_finished_run(instance, retry.run_id, timeout=120)
        assert finished.status == dg.DagsterRunStatus.SUCCESS
        print(
            "FAULT-FIGURES killed prestarted run process: failed "
            f"{failure.event_log_entry.timestamp - killed_at:.3f} s after SIGKILL, failed and "
            f"slot free seen {released:.2f} s after it; next run done "
            f"{time.monotonic() - killed:.2f} s after it"
        )
