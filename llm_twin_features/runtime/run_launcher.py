"""The laptop's run launcher: each run goes to a Python process started before the run existed.

Dagster's `DefaultRunLauncher` asks the code server to start a run, and the code server starts
a fresh interpreter for it (multiprocessing "spawn") that imports Dagster and the code location
before the first step: 3-5 s of a single event's latency, which the stages themselves need only
about 1.5 s of. This launcher keeps such processes ready per code location: each has imported
Dagster, the code location and what the stages import, built its repository, and waits for a
run (run_worker.py). A run launched here goes to one of them, which executes it exactly as
`dagster api execute_run` does (the command Dagster's Docker and Kubernetes launchers run).
Two are kept ready, so that the replacement of the one that took a run starts importing when
that run has ended rather than beside it (on 2 cores an import beside a run slows its step);
when none is left for the next run, one starts at once, importing while the run goes on.

It falls back to `DefaultRunLauncher` (the code server) whenever the ready process cannot take
the run: the first run after start-up (nothing ready yet), a code location in another Python
environment, a process that died or could not prepare the run (run_worker.py), or an edit to
the code location's files after the process started (an edit never runs with old code); and on
any error on the way, from reading the run's
code location and building its `execute_run` arguments to the ready process taking it (logged
as a warning): the private Dagster API this path needs (dagster_private.py) may change with a
Dagster upgrade, and a launch must not fail for it. Once the process has taken the run, the run
is its own: nothing falls back then (that would run it twice). Terminating a run it started
sends its process SIGTERM, which Dagster turns into a cancelled run.

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
import time

import dagster as dg

from llm_twin_features.runtime import dagster_private
from llm_twin_features.runtime.dead_runs import HOST_TAG, PID_TAG, owner_tags, process_gone
from llm_twin_features.runtime.run_worker import RUN

log = logging.getLogger(__name__)

LAUNCHED_BY_TAG = "llm_twin/launched_by"
PRESTARTED = "prestarted-process"
# A process started a moment ago may still be importing (a burst of runs): wait for it rather
# than start another; past this, something is wrong with it and the usual launch path runs.
HAND_OVER_TIMEOUT_SECONDS = 120.0
# Processes kept ready per code location: one for the next run and a spare for the run after,
# so that the replacement of a process that took a run can start when that run has ended. A
# process imports for 2-3 s of a core; started beside a run on 2 cores, it slowed that run's
# step by 0.3-0.8 s (about 150 MB each).
READY_PROCESSES = 2


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
        """Gives it the run; True once it has taken it (it then runs on by itself). Otherwise,
        whatever went wrong, the process is gone on return."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(request + "\n")
            self.process.stdin.close()
            ready, _, _ = select.select([self.replies], [], [], timeout)
            answer = self.replies.readline().strip() if ready else ""
        except OSError:  # it died before reading the run
            answer = ""
        except Exception as error:
            log.warning(f"could not hand a run to process {self.pid}: {error!r}")
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


class PrestartedProcessRunLauncher(dagster_private.RegisteredInstance, dg.DefaultRunLauncher):
    """`DefaultRunLauncher` that hands runs to a process started ahead of time when it can."""

    def __init__(self, inst_data: dagster_private.ConfigurableClassData | None = None) -> None:
        super().__init__(inst_data=inst_data)
        self._lock = threading.Lock()
        # by serialized repository origin, the longest ready first
        self._ready: dict[str, list[PrestartedRunProcess]] = {}
        self._watchers: dict[str, threading.Thread] = {}  # by run id: runs it handed over
        # run id -> the code location to start a ready process for once that run has ended
        self._top_up_after: dict[str, dagster_private.RepositoryPythonOrigin] = {}

    def launch_run(self, context: dagster_private.LaunchRunContext) -> None:
        run = context.dagster_run
        origin = None
        try:
            origin = self._prestartable_origin(run)
            launched = origin is not None and self._hand_to_ready_process(run, origin)
        except Exception as error:  # a Dagster upgrade changed its private API, or a bug here
            log.warning(
                f"run {run.run_id}: the process started ahead of time cannot take it "
                f"({error!r}); the code server launches it",
                exc_info=True,
            )
            launched = False
        if not launched:
            super().launch_run(context)
        if origin is None:
            return
        if launched:  # back to READY_PROCESSES when this run has ended (`_watch`)
            with self._lock:
                self._top_up_after[run.run_id] = origin
        if not self._ready_count(origin):  # none for the next run: one now, beside this run
            self._prestart_next(origin, count=1)

    def _prestartable_origin(
        self, run: dg.DagsterRun
    ) -> dagster_private.RepositoryPythonOrigin | None:
        """The code location of `run` if a process started here can run it: one in this Python
        environment (another environment's code server knows it)."""
        origin = dagster_private.code_location_origin(run)
        if origin is None or dagster_private.python_executable(origin) != sys.executable:
            return None
        return origin

    def _hand_to_ready_process(
        self, run: dg.DagsterRun, origin: dagster_private.RepositoryPythonOrigin
    ) -> bool:
        """Hands `run` to the process ready for its code location; False if none took it."""
        instance = self.registered_instance
        if instance is None:
            raise RuntimeError("no Dagster instance registered with the run launcher")
        # Built before a ready process is taken: if this fails, that process waits on.
        request = dagster_private.execute_run_request(run, instance)
        key = dg.serialize_value(origin)
        with self._lock:
            waiting = self._ready.get(key, [])
            ready = waiting.pop(0) if waiting else None
        if ready is None or not ready.hand_over(request):
            return False
        self._took(instance, run, ready)
        return True

    def _took(
        self, instance: dg.DagsterInstance, run: dg.DagsterRun, ready: PrestartedRunProcess
    ) -> None:
        """Records that process `ready` took `run` and waits for it; never raises: the run is
        that process's now, launching it again would run it twice."""
        try:
            instance.add_run_tags(
                run.run_id, {LAUNCHED_BY_TAG: PRESTARTED, **owner_tags(ready.pid)}
            )
            instance.report_engine_event(
                f"Run handed to a process started ahead of time (pid {ready.pid}).",
                run,
                cls=self.__class__,
            )
        except Exception:
            log.exception(f"run {run.run_id}: could not record that process {ready.pid} runs it")
        try:
            watcher = threading.Thread(
                target=self._watch,
                args=(ready.process, run.run_id),
                daemon=True,
                name=f"run-process-{ready.pid}",
            )
            with self._lock:
                self._watchers[run.run_id] = watcher
            watcher.start()
        except Exception:
            with self._lock:
                self._watchers.pop(run.run_id, None)
            log.exception(f"run {run.run_id}: could not watch its process {ready.pid}")

    def _prestart_next(
        self, origin: dagster_private.RepositoryPythonOrigin, count: int = READY_PROCESSES
    ) -> None:
        """`prestart`, for the runs after this one; a failure only costs them the speed-up."""
        try:
            self.prestart(origin, count)
        except Exception:
            log.warning("could not start a process ahead of the next run", exc_info=True)

    def _ready_count(self, origin: dagster_private.RepositoryPythonOrigin) -> int:
        with self._lock:
            return len(self._ready.get(dg.serialize_value(origin), []))

    def _watch(self, process: subprocess.Popen, run_id: str) -> None:
        """Waits for the process of run `run_id` to end; if the run has not finished by then
        (the process was killed outright), fails it, or cancels it if it was being cancelled,
        and frees its pool slots."""
        exit_code = process.wait()  # reaps it: no zombie
        with self._lock:
            top_up = self._top_up_after.pop(run_id, None)
        if top_up is not None:
            self._prestart_next(top_up)
        try:
            instance = self.registered_instance
            if instance is None:
                return
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
            log.exception(f"could not settle run {run_id}")
        finally:
            with self._lock:
                self._watchers.pop(run_id, None)

    def join(self, timeout: int = 30) -> None:
        """Waits for the runs it launched to finish: the code server's (`DefaultRunLauncher`)
        and those it handed to a process started ahead of time (until the process ended and
        its run was settled)."""
        deadline = time.monotonic() + timeout
        super().join(timeout)
        with self._lock:
            watchers = dict(self._watchers)
        for watcher in watchers.values():
            watcher.join(max(0.0, deadline - time.monotonic()))
        running = [run_id for run_id, watcher in watchers.items() if watcher.is_alive()]
        if running:
            raise TimeoutError(f"Timed out waiting for these runs to finish: {running!r}")

    @property
    def supports_check_run_worker_health(self) -> bool:
        return dagster_private.worker_health_supported()

    def check_run_worker_health(self, run: dg.DagsterRun) -> dagster_private.CheckRunHealthResult:
        """For the daemon's run monitoring: a started run whose recorded process is gone has
        failed; any other is taken as running (a run launched elsewhere, another host's)."""
        if process_gone(run):
            return dagster_private.worker_health(
                f"the process of this run (pid {run.tags[PID_TAG]}) is gone"
            )
        return dagster_private.worker_health(None)

    def prestart(
        self, repository_origin: dagster_private.RepositoryPythonOrigin, count: int = 1
    ) -> None:
        """Starts processes for the next runs of this code location until `count` are ready
        (or starting)."""
        key = dg.serialize_value(repository_origin)
        with self._lock:
            ready = self._ready.setdefault(key, [])
            while len(ready) < count:
                ready.append(PrestartedRunProcess(sys.executable, key))

    def terminate(self, run_id: str) -> bool:
        instance = self.registered_instance
        run = instance.get_run_by_id(run_id) if instance is not None else None
        if (
            instance is None
            or run is None
            or run.is_finished
            or run.tags.get(LAUNCHED_BY_TAG) != PRESTARTED
            or run.tags.get(HOST_TAG) != socket.gethostname()
        ):
            return super().terminate(run_id)
        instance.report_run_canceling(run)
        try:
            os.kill(int(run.tags[PID_TAG]), signal.SIGTERM)  # Dagster cancels the run
        except ProcessLookupError:
            return False
        return True

    def dispose(self) -> None:
        with self._lock:
            ready = [process for waiting in self._ready.values() for process in waiting]
            self._ready = {}
        for process in ready:
            process.stop()
        super().dispose()
