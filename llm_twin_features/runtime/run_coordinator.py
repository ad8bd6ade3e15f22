"""The laptop's run coordinator: a run starts at once when the instance has room, else queues.

Dagster's `QueuedRunCoordinator` hands every run to the run-queue daemon, which looks at the
queue once per `dequeue_interval_seconds` (1 s at the least), so an event run waited up to a
second before its process even started: a large share of a single event's few seconds.
Launching every run at submission (`DefaultRunCoordinator`) would let a burst's runs overlap
and fight over Qdrant local mode's one-process lock. This coordinator does both: when nothing
is queued and fewer runs than `max_concurrent_runs` are in progress, a submitted run is
launched right away; otherwise it joins the queue and the daemon launches it as usual. With
tag concurrency limits configured it always queues (the daemon enforces those).

Two submissions at the very same moment may both find room and overlap once; runs stay
correct then (Qdrant local's lock and the `feature_store` pool serialize their writes).
"""

from __future__ import annotations

import logging

import dagster as dg

from llm_twin_features.runtime import dagster_private

log = logging.getLogger(__name__)

BUSY = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


class LaunchWhenIdleRunCoordinator(dagster_private.RegisteredInstance, dg.QueuedRunCoordinator):
    """`QueuedRunCoordinator` (same config) that skips the queue while there is room."""

    def submit_run(self, context: dg.SubmitRunContext) -> dg.DagsterRun:
        run = context.dagster_run
        instance = self.registered_instance
        if (
            instance is not None
            and run.status == dg.DagsterRunStatus.NOT_STARTED
            and self._has_room_or_queue(run)
        ):
            instance.launch_run(run.run_id, context.workspace)
            launched = instance.get_run_by_id(run.run_id)
            assert launched is not None
            return launched
        return super().submit_run(context)

    def _has_room_or_queue(self, run: dg.DagsterRun) -> bool:
        """`has_room`; False (the run queues, as with `QueuedRunCoordinator`) if it failed."""
        try:
            return self.has_room()
        except Exception as error:  # a Dagster upgrade changed what it reads, storage down
            log.warning(f"run {run.run_id}: queued, could not tell if there is room: {error!r}")
            return False

    def has_room(self) -> bool:
        """Nothing queued, and fewer runs in progress than the limit."""
        instance = self.registered_instance
        limits = None if instance is None else dagster_private.run_queue_limits(instance)
        if instance is None or limits is None:
            return False
        max_concurrent_runs, tag_limits = limits
        if tag_limits:
            return False
        runs = instance.get_runs(filters=dg.RunsFilter(statuses=BUSY))
        if any(r.status == dg.DagsterRunStatus.QUEUED for r in runs):
            return False
        return max_concurrent_runs == -1 or len(runs) < max_concurrent_runs
