"""When the laptop's run coordinator launches at once and when it leaves a run to the queue.

The launch itself is exercised for real by tests/e2e/test_events_e2e.py (daemon + code server):
there the event run must carry no "enqueued" event."""

import logging

import dagster as dg
import pytest
import yaml
from dagster._core.remote_origin import InProcessCodeLocationOrigin, RemoteRepositoryOrigin
from dagster._core.test_utils import create_run_for_test
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

from llm_twin_features.cli.common import REPO_DAGSTER_YAML
from llm_twin_features.runtime import dagster_private
from llm_twin_features.runtime.run_coordinator import LaunchWhenIdleRunCoordinator

JOB = "feature_pipeline_job"


def job_origin():
    location = InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name="llm_twin_features"))
    return RemoteRepositoryOrigin(location, "__repository__").get_job_origin(JOB)


@pytest.fixture
def laptop_instance(tmp_path):
    """An instance with the repository's dagster.yaml (max_concurrent_runs 1)."""
    (tmp_path / "dagster.yaml").write_text(REPO_DAGSTER_YAML.read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        yield instance


def test_the_laptop_instance_uses_it(laptop_instance):
    assert isinstance(laptop_instance.run_coordinator, LaunchWhenIdleRunCoordinator)
    assert laptop_instance.run_coordinator.dequeue_interval_seconds == 1


@pytest.mark.parametrize(
    ("others", "has_room"),
    [
        ([], True),
        ([dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE], True),
        ([dg.DagsterRunStatus.STARTED], False),  # the limit of one is taken
        ([dg.DagsterRunStatus.STARTING], False),
        ([dg.DagsterRunStatus.QUEUED], False),  # never jump the queue
    ],
)
def test_it_launches_only_when_nothing_waits_and_the_limit_allows(
    laptop_instance, others, has_room
):
    origin = job_origin()
    for status in others:
        create_run_for_test(laptop_instance, job_name=JOB, status=status, remote_job_origin=origin)
    assert laptop_instance.run_coordinator.has_room() is has_room


def test_with_tag_limits_it_always_queues(tmp_path):
    config = yaml.safe_load(REPO_DAGSTER_YAML.read_text())
    config["concurrency"]["runs"]["max_concurrent_runs"] = 5
    config["concurrency"]["runs"]["tag_concurrency_limits"] = [{"key": "team", "limit": 1}]
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.run_coordinator.has_room() is False  # the daemon enforces tag limits


def test_when_it_cannot_tell_if_there_is_room_it_queues(laptop_instance, monkeypatch, caplog):
    """As after a Dagster upgrade that changed the concurrency settings it reads."""

    def changed_by_an_upgrade(instance):
        raise AttributeError("run_queue_config: changed by a Dagster upgrade")

    monkeypatch.setattr(dagster_private, "run_queue_limits", changed_by_an_upgrade)
    run = create_run_for_test(
        laptop_instance,
        job_name=JOB,
        status=dg.DagsterRunStatus.NOT_STARTED,
        remote_job_origin=job_origin(),
    )
    with caplog.at_level(logging.WARNING, logger="llm_twin_features.runtime.run_coordinator"):
        coordinator = laptop_instance.run_coordinator
        submitted = coordinator.submit_run(dg.SubmitRunContext(run, workspace=None))
    assert submitted.status == dg.DagsterRunStatus.QUEUED  # the daemon launches it
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "changed by a Dagster upgrade" in warning.getMessage()
