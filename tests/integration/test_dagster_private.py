"""Each use of Dagster's private API (llm_twin_features/runtime/dagster_private.py) checked against
the installed Dagster: a Dagster upgrade that changes one fails here, naming what changed and what
to update, while the laptop run launcher falls back to Dagster's own path. Also checked: nothing
else in runtime/ imports `dagster._*` or reads a private attribute of Dagster's, and the private
modules are imported only when called (the guard)."""

from __future__ import annotations

import ast
import contextlib
import inspect
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import click
import dagster as dg
import pytest

from llm_twin_features.runtime import dagster_private
from llm_twin_features.runtime.run_coordinator import LaunchWhenIdleRunCoordinator
from llm_twin_features.runtime.run_launcher import PrestartedProcessRunLauncher

RUNTIME = Path(dagster_private.__file__).parent
MODULE = "llm_twin_features/runtime/dagster_private.py"
LAUNCHER_FALLBACK = "it falls back to the code server's launch meanwhile"
HEALTH_FALLBACK = "it offers the daemon no run monitoring meanwhile"
COORDINATOR_FALLBACK = "it queues every run for the daemon meanwhile"
LAUNCHER = {
    "module": "llm_twin_features.runtime.run_launcher",
    "class": "PrestartedProcessRunLauncher",
}
COORDINATOR = {
    "module": "llm_twin_features.runtime.run_coordinator",
    "class": "LaunchWhenIdleRunCoordinator",
}


@contextlib.contextmanager
def uses(what: str, fallback: str = LAUNCHER_FALLBACK, component: str = "run launcher") -> Iterator:
    """Fails the test with what to update if the block raises (an assertion included)."""
    try:
        yield
    except Exception as error:
        pytest.fail(
            f"Dagster {dg.__version__} changed {what}: the laptop {component} needs updating "
            f"({MODULE}); {fallback}. ({type(error).__name__}: {error})",
            pytrace=False,
        )


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


@dg.op
def nothing() -> None:
    pass


@dg.job(executor_def=dg.in_process_executor)
def nothing_job():
    nothing()


@pytest.fixture
def instance():
    with dg.instance_for_test(
        overrides={"run_launcher": LAUNCHER, "run_coordinator": COORDINATOR}
    ) as instance:
        yield instance


@pytest.fixture
def finished_run(instance) -> dg.DagsterRun:
    """A run of this module's job, executed through public API: it has a job code origin."""
    with dg.execute_job(dg.reconstructable(nothing_job), instance) as result:
        assert result.success
        run = instance.get_run_by_id(result.run_id)
    assert run is not None
    return run


def test_the_run_names_its_code_location_and_python(finished_run):
    with uses("dagster._core.origin JobPythonOrigin.repository_origin / executable_path"):
        origin = dagster_private.code_location_origin(finished_run)
        assert origin is not None, "a run of a reconstructable job has no job_code_origin"
        assert dagster_private.python_executable(origin) == sys.executable


def test_execute_run_args_carry_the_run(instance, finished_run):
    with uses("dagster._grpc.types.ExecuteRunArgs"):
        from dagster._grpc.types import ExecuteRunArgs

        names = parameters(ExecuteRunArgs)
        assert names[:3] == ["job_origin", "run_id", "instance_ref"], names
        required = [
            name
            for name, parameter in inspect.signature(ExecuteRunArgs).parameters.items()
            if parameter.default is inspect.Parameter.empty
        ]
        assert set(required) <= {"job_origin", "run_id", "instance_ref"}, required
        request = dagster_private.execute_run_request(finished_run, instance)
        assert dagster_private.run_id_of_request(request) == finished_run.run_id
        arguments = dg.deserialize_value(request, ExecuteRunArgs)
        assert arguments.job_origin == finished_run.job_code_origin
        assert arguments.instance_ref == instance.get_ref()


def test_a_code_location_loads_from_its_serialized_origin(finished_run):
    with uses("dagster._utils.hosted_user_process.recon_repository_from_origin"):
        from dagster._core.origin import RepositoryPythonOrigin
        from dagster._utils.hosted_user_process import recon_repository_from_origin

        assert parameters(recon_repository_from_origin) == ["origin"]
        origin = dagster_private.code_location_origin(finished_run)
        assert isinstance(origin, RepositoryPythonOrigin), type(origin)
        dagster_private.load_code_location(dg.serialize_value(origin))


def test_the_api_cli_has_execute_run():
    with uses("dagster._cli.api.api_cli (`dagster api execute_run`)"):
        from dagster._cli.api import api_cli

        assert isinstance(api_cli, click.Group), type(api_cli)
        command = api_cli.commands["execute_run"]
        arguments = [p.name for p in command.params if isinstance(p, click.Argument)]
        assert arguments == ["input_json"], arguments
        assert {"args", "prog_name"} <= set(parameters(api_cli.main))
        dagster_private.prepare_run_execution()


def test_execute_run_runs_a_run_in_this_process(instance, finished_run, tmp_path):
    """What the run worker does once it has taken a run, in a process of its own."""
    run = instance.create_run_for_job(
        job_def=nothing_job, job_code_origin=finished_run.job_code_origin
    )
    request = dagster_private.execute_run_request(run, instance)
    script = textwrap.dedent(
        """
        import sys
        from llm_twin_features.runtime import dagster_private
        dagster_private.execute_run(sys.stdin.read())
        """
    )
    with uses("dagster._cli.api.api_cli.main (`dagster api execute_run`)"):
        done = subprocess.run(
            [sys.executable, "-c", script],
            input=request,
            capture_output=True,
            text=True,
            timeout=300,
        )
        finished = instance.get_run_by_id(run.run_id)
        assert finished is not None and finished.status == dg.DagsterRunStatus.SUCCESS, (
            f"run {finished and finished.status}, exit code {done.returncode}: {done.stderr}"
        )


def test_worker_health_results():
    with uses("dagster._core.launcher CheckRunHealthResult / WorkerStatus", HEALTH_FALLBACK):
        from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

        assert CheckRunHealthResult._fields[:2] == ("status", "msg"), CheckRunHealthResult._fields
        assert {"RUNNING", "FAILED"} <= set(WorkerStatus.__members__)
        assert dagster_private.worker_health(None).status == WorkerStatus.RUNNING
        failed = dagster_private.worker_health("gone")
        assert (failed.status, failed.msg) == (WorkerStatus.FAILED, "gone")
        assert dagster_private.worker_health_supported()


def test_the_instance_registers_itself_with_its_launcher_and_coordinator(instance):
    what = "how the instance hands itself over (MayHaveInstanceWeakref.register_instance)"
    with uses(what):
        from dagster._core.instance.types import MayHaveInstanceWeakref

        assert parameters(MayHaveInstanceWeakref.register_instance) == ["self", "instance"]
        assert isinstance(instance.run_launcher, PrestartedProcessRunLauncher)
        assert instance.run_launcher.registered_instance is instance
    with uses(what, COORDINATOR_FALLBACK, "run coordinator"):
        assert isinstance(instance.run_coordinator, LaunchWhenIdleRunCoordinator)
        assert instance.run_coordinator.registered_instance is instance


@pytest.mark.parametrize("tag_limits", [False, True])
def test_the_run_queue_limits_read(tag_limits):
    runs: dict = {"max_concurrent_runs": 3}
    if tag_limits:
        runs["tag_concurrency_limits"] = [{"key": "team", "limit": 1}]
    overrides = {"run_coordinator": COORDINATOR, "concurrency": {"runs": runs}}
    what = "DagsterInstance.get_concurrency_config().run_queue_config (RunQueueConfig)"
    with dg.instance_for_test(overrides=overrides) as instance:
        limits = uses(what, COORDINATOR_FALLBACK, "run coordinator")
        with limits:
            assert dagster_private.run_queue_limits(instance) == (3, tag_limits)


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node, node.module


def _private_dagster(module: str) -> bool:
    return module.startswith("dagster._")


def test_runtime_imports_no_private_dagster_outside_the_guarded_module():
    offending = [
        f"{path.name}:{node.lineno} imports {module}"
        for path in sorted(RUNTIME.glob("*.py"))
        if path.name != "dagster_private.py"
        for node, module in _imports(ast.parse(path.read_text()))
        if _private_dagster(module)
    ]
    assert not offending, f"move these into {MODULE}: {offending}"


def test_the_guarded_module_imports_private_dagster_only_when_called():
    tree = ast.parse((RUNTIME / "dagster_private.py").read_text())
    type_checking = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    ]
    allowed = {id(n) for block in type_checking for n in ast.walk(block)}
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    allowed |= {id(n) for function in functions for n in ast.walk(function)}
    offending = [
        f"line {node.lineno}: {module}"
        for node, module in _imports(tree)
        if _private_dagster(module) and id(node) not in allowed
    ]
    assert not offending, (
        f"{MODULE} imports Dagster's private modules when it is imported: a Dagster upgrade "
        f"that moved one would stop the instance from loading its run launcher: {offending}"
    )


@pytest.mark.parametrize("name", ["run_launcher.py", "run_worker.py", "run_coordinator.py"])
def test_runtime_reads_no_private_attribute_of_dagster(name):
    """Attributes named `_x` are read only where this file defines them (its own state)."""
    tree = ast.parse((RUNTIME / name).read_text())
    own = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
    }
    own |= {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
    }
    read = {
        f"{ast.unparse(node.value)}.{node.attr} (line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and node.attr not in own
    }
    assert not read, f"{name} reads private attributes it does not define: {sorted(read)}"
