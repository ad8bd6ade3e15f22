"""The laptop's run launcher: each run goes to a Python process started before the run existed.

Dagster's `DefaultRunLauncher` asks the code server to start a run, and the code server starts
a fresh interpreter for it (multiprocessing "spawn") that imports Dagster and the code location
before the first step: 3-5 s of a single event's latency, which the stages themselves need only
about 1.5 s of. This launcher keeps one such process ready per code location: it has imported
Dagster, the code location and built its repository, and waits for a run (run_worker.py). A run
launched here goes to that process, which executes it exactly as `dagster api execute_run` does
(the command Dagster's Docker and Kubernetes launchers run), and the next process starts at
once, importing while the run goes on.

It falls back to `DefaultRunLauncher` (the code server) whenever the ready process cannot take
the run: the first run after start-up (nothing ready yet), a code location in another Python
environment, a process that died, or an edit to the code location's files after the process
started (an edit never runs with old code). Terminating a run it started sends its
process SIGTERM, which Dagster turns into a cancelled run.

A thread waits for each process it gave a run to, as the code server does for the runs it
starts: a process killed outright (SIGKILL, the OOM killer) never stays a zombie, and its run,
not finished, is failed and its pool slots freed at once (else every later run would wait for
them). The daemon's run monitoring also asks it about each started run
(`check_run_worker_health`): a run whose recorded process is gone (dead_runs.py) has failed.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading

import dagster as dg
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, WorkerStatus
from dagster._core.origin import RepositoryPythonOrigin
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import serialize_value

from llm_twin_features.runtime.dead_runs import HOST_TAG, PID_TAG, owner_tags, process_gone
from llm_twin_features.runtime.run_worker import RUN

LAUNCHED_BY_TAG = "llm_twin/launched_by"
PRESTARTED = "prestarted-process"
# A process started a moment ago may still be importing (a burst of runs): wait for it rather
# than start another; past this, something is wrong with it and the usual launch path runs.
HAND_OVER_TIMEOUT_SECONDS = 120.0


def _ending(exit_code: int) -> str:
    """How a process ended, from its Popen return code (-N: killed by signal N)."""
    if exit_code < 0:
        try:
            return f"was killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"was killed by signal {-exit_code}"
    return f"exited with code {exit_code}"


class PrestartedRunProcess:
    """One `run_worker` process and the pipe it answers on."""

    def __init__(self, executable: str, serialized_origin: str) -> None:
        read_fd, write_fd = os.pipe()
        try:
            self.process = subprocess.Popen(
                [
                    executable,
                    "-m",
                    "llm_twin_features.runtime.run_worker",
                    serialized_origin,
                    str(write_fd),
                ],
                stdin=subprocess.PIPE,
                pass_fds=(write_fd,),
                text=True,
            )
        finally:
            os.close(write_fd)
        self.replies = os.fdopen(read_fd)

    @property
    def pid(self) -> int:
        return self.process.pid

    def hand_over(self, request: str, timeout: float = HAND_OVER_TIMEOUT_SECONDS) -> bool:
        """Gives it the run; True once it has taken it (it then runs on by itself)."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(request + "\n")
            self.process.stdin.close()
            ready, _, _ = select.select([self.replies], [], [], timeout)
            answer = self.replies.readline().strip() if ready else ""
        except OSError:  # it died before reading the run
            answer = ""
        finally:
            self.replies.close()
        if answer != RUN:
            self.process.kill()
            self.process.wait()
        return answer == RUN

    def stop(self, timeout: float = 5.0) -> None:
        """Closes its stdin, the sign to exit; kills it if it does not."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
            self.process.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            self.replies.close()


class PrestartedProcessRunLauncher(dg.DefaultRunLauncher):
    """`DefaultRunLauncher` that hands runs to a process started ahead of time when it can."""

    def __init__(self, inst_data=None) -> None:
        super().__init__(inst_data=inst_data)
        self._lock = threading.Lock()
        self._ready: dict[str, PrestartedRunProcess] = {}  # by serialized repository origin

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        origin = run.job_code_origin
        if origin is None or origin.repository_origin.executable_path != sys.executable:
            super().launch_run(context)  # another environment: its code server knows it
            return
        key = serialize_value(origin.repository_origin)
        with self._lock:
            ready = self._ready.pop(key, None)
        request = serialize_value(
            ExecuteRunArgs(
                job_origin=origin, run_id=run.run_id, instance_ref=self._instance.get_ref()
            )
        )
        if ready is not None and ready.hand_over(request):
            self._instance.add_run_tags(
                run.run_id, {LAUNCHED_BY_TAG: PRESTARTED, **owner_tags(ready.pid)}
            )
            self._instance.report_engine_event(
                f"Run handed to a process started ahead of time (pid {ready.pid}).",
                run,
                cls=self.__class__,
            )
            self._run_ids.add(run.run_id)
            threading.Thread(
                target=self._watch,
                args=(ready.process, run.run_id),
                daemon=True,
                name=f"run-process-{ready.pid}",
            ).start()
        else:
            super().launch_run(context)
        self.prestart(origin.repository_origin)

    def _watch(self, process: subprocess.Popen, run_id: str) -> None:
        """Waits for the process of run `run_id` to end; if the run has not finished by then
        (the process was killed outright), fails it, or cancels it if it was being cancelled,
        and frees its pool slots."""
        exit_code = process.wait()  # reaps it: no zombie
        try:
            if not self.has_instance:
                return
            instance = self._instance
            run = instance.get_run_by_id(run_id)
            if run is None:
                return
            if not run.is_finished:
                message = (
                    f"The process of this run (pid {process.pid}) {_ending(exit_code)} before "
                    "the run finished; its pool slots were freed so that later runs proceed."
                )
                instance.report_engine_event(message, run, cls=self.__class__)
                if run.status == dg.DagsterRunStatus.CANCELING:
                    instance.report_run_canceled(run, message)
                else:
                    instance.report_run_failed(run, message)
            instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        except Exception:  # the instance was disposed of meanwhile, storage unavailable
            logging.getLogger(__name__).exception(f"could not settle run {run_id}")

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        """For the daemon's run monitoring: a started run whose recorded process is gone has
        failed; any other is taken as running (a run launched elsewhere, another host's)."""
        if process_gone(run):
            return CheckRunHealthResult(
                WorkerStatus.FAILED, f"the process of this run (pid {run.tags[PID_TAG]}) is gone"
            )
        return CheckRunHealthResult(WorkerStatus.RUNNING)

    def prestart(self, repository_origin: RepositoryPythonOrigin) -> None:
        """Starts the process for the next run of this code location, unless one is ready."""
        key = serialize_value(repository_origin)
        with self._lock:
            if key not in self._ready:
                self._ready[key] = PrestartedRunProcess(sys.executable, key)

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id) if self.has_instance else None
        if (
            run is None
            or run.is_finished
            or run.tags.get(LAUNCHED_BY_TAG) != PRESTARTED
            or run.tags.get(HOST_TAG) != socket.gethostname()
        ):
            return super().terminate(run_id)
        self._instance.report_run_canceling(run)
        try:
            os.kill(int(run.tags[PID_TAG]), signal.SIGTERM)  # Dagster cancels the run
        except ProcessLookupError:
            return False
        return True

    def dispose(self) -> None:
        with self._lock:
            ready, self._ready = list(self._ready.values()), {}
        for process in ready:
            process.stop()
        super().dispose()
