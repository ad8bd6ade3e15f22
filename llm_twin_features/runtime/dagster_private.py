"""Every use of Dagster's private API by the laptop's run launcher, run worker and run coordinator.

The prestarted run process (run_launcher.py, run_worker.py) does what Dagster's own launchers
do internally: build the arguments of `dagster api execute_run` and run that command, in a
process that loaded the code location beforehand. Dagster offers no public API for that, so
this module wraps the private pieces, each in a small function saying what it wraps and why.
Nothing else in runtime/ imports `dagster._*` or reads a private attribute of Dagster's.

Guarded: no private module is imported when this module is (only under TYPE_CHECKING, for
annotations); each function imports what it needs when called. A Dagster upgrade that moves or
changes one therefore makes that call raise instead of making the instance unable to load its
run launcher, and each caller falls back to Dagster's own path: the launcher to the code
server's launch (`DefaultRunLauncher`), the run worker declines the run (the launcher then does
the same), the coordinator queues the run, and the launcher stops offering run monitoring.
tests/integration/test_dagster_private.py checks each use against the installed Dagster and
names what to update when one changed.
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:  # for annotations only, here and in its users: never imported at run time
    import click
    from dagster._core.launcher import CheckRunHealthResult as CheckRunHealthResult
    from dagster._core.launcher import LaunchRunContext as LaunchRunContext
    from dagster._core.origin import RepositoryPythonOrigin as RepositoryPythonOrigin
    from dagster._serdes import ConfigurableClassData as ConfigurableClassData


class RegisteredInstance:
    """Mixin for a run launcher or run coordinator: keeps the instance it belongs to.

    Dagster's base classes keep it as `_instance` (`MayHaveInstanceWeakref` in
    dagster._core.instance.types), a private property; no public accessor exists. The instance
    hands itself to its run launcher and run coordinator by calling their `register_instance`,
    which this extends to keep a weak reference of its own (weak as Dagster's: the instance owns
    them). Put it before the Dagster base class."""

    _registered: weakref.ref[dg.DagsterInstance] | None = None

    def register_instance(self, instance: dg.DagsterInstance) -> None:
        super().register_instance(instance)  # type: ignore[misc]
        self._registered = weakref.ref(instance)

    @property
    def registered_instance(self) -> dg.DagsterInstance | None:
        """The instance this belongs to; None before it registered, or once it is gone."""
        registered = self._registered
        return None if registered is None else registered()


def code_location_origin(run: dg.DagsterRun) -> RepositoryPythonOrigin | None:
    """Where the code of `run` lives: its `job_code_origin`'s repository origin (a
    RepositoryPythonOrigin of dagster._core.origin), None if the run has none. Both types are
    private: Dagster has no public description of a run's code location."""
    job_origin = run.job_code_origin
    return None if job_origin is None else job_origin.repository_origin


def python_executable(origin: RepositoryPythonOrigin) -> str:
    """The Python interpreter that runs the code location of `origin` (private
    RepositoryPythonOrigin.executable_path)."""
    return origin.executable_path


def execute_run_request(run: dg.DagsterRun, instance: dg.DagsterInstance) -> str:
    """The serialized arguments of `dagster api execute_run` for `run`: an ExecuteRunArgs
    (dagster._grpc.types) naming its job origin, id and instance, as Dagster's Docker and
    Kubernetes launchers build them. That command and its arguments are Dagster's internal
    interface between a launcher and the run's process; there is no public equivalent."""
    from dagster._grpc.types import ExecuteRunArgs

    job_origin = run.job_code_origin
    if job_origin is None:
        raise ValueError(f"run {run.run_id} has no job code origin")
    return dg.serialize_value(
        ExecuteRunArgs(job_origin=job_origin, run_id=run.run_id, instance_ref=instance.get_ref())
    )


def run_id_of_request(request: str) -> str:
    """The run id of a request built by `execute_run_request`: checks that this process's
    Dagster reads it as ExecuteRunArgs before the run worker takes the run."""
    from dagster._grpc.types import ExecuteRunArgs

    return dg.deserialize_value(request, ExecuteRunArgs).run_id


def load_code_location(serialized_origin: str) -> None:
    """Imports the code location of a serialized RepositoryPythonOrigin (dagster._core.origin)
    and builds its definitions, as `dagster api execute_run` will for the run, via
    dagster._utils.hosted_user_process.recon_repository_from_origin: Dagster has no public API
    to load a code location from its origin."""
    from dagster._core.origin import RepositoryPythonOrigin
    from dagster._utils.hosted_user_process import recon_repository_from_origin

    origin = dg.deserialize_value(serialized_origin, RepositoryPythonOrigin)
    recon_repository_from_origin(origin).get_definition()


def _execute_run_command() -> click.Command:
    """The `execute_run` command of Dagster's hidden `dagster api` CLI group
    (dagster._cli.api.api_cli), importing what it needs."""
    from dagster._cli.api import api_cli

    command = api_cli.commands.get("execute_run")
    if command is None:
        raise LookupError("dagster._cli.api.api_cli has no execute_run command")
    return command


def prepare_run_execution() -> None:
    """Imports what `execute_run` needs and checks that the command exists, ahead of the run:
    the run worker does this while it waits, so a run it takes starts at once."""
    _execute_run_command()


def execute_run(request: str) -> None:
    """Executes the run of `request` (`execute_run_request`) in this process exactly as
    `dagster api execute_run REQUEST` does, then exits the process with its exit code. Wraps the
    CLI's click `main` (dagster._cli.api.api_cli): Dagster has no public function that executes
    an existing run in the current process."""
    from dagster._cli.api import api_cli

    api_cli.main(args=["execute_run", request], prog_name="dagster api")


def worker_health(failure: str | None) -> CheckRunHealthResult:
    """What `check_run_worker_health` answers the daemon's run monitoring: the run's process is
    running, or it failed for the reason `failure`. CheckRunHealthResult and WorkerStatus
    (dagster._core.launcher) are not exported by `dagster`, yet are that method's contract."""
    from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

    if failure is None:
        return CheckRunHealthResult(WorkerStatus.RUNNING)
    return CheckRunHealthResult(WorkerStatus.FAILED, failure)


@functools.cache
def worker_health_supported() -> bool:
    """Whether `worker_health` works with the installed Dagster (the launcher offers run
    monitoring only then)."""
    try:
        worker_health(None)
        worker_health("a check")
    except Exception:
        return False
    return True


def run_queue_limits(instance: dg.DagsterInstance) -> tuple[int, bool] | None:
    """The instance's run queue limits, `concurrency:` settings of dagster.yaml applied:
    (max_concurrent_runs, whether tag concurrency limits are set); None without a run queue.
    `DagsterInstance.get_concurrency_config` returns private types (ConcurrencyConfig of
    dagster._core.instance.config, RunQueueConfig): no public API reads these limits."""
    queue = instance.get_concurrency_config().run_queue_config
    if queue is None:
        return None
    return int(queue.max_concurrent_runs), bool(queue.tag_concurrency_limits)
