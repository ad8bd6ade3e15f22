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

import dagster as dg

BUSY = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


class LaunchWhenIdleRunCoordinator(dg.QueuedRunCoordinator):
    """`QueuedRunCoordinator` (same config) that skips the queue while there is room."""

    def submit_run(self, context: dg.SubmitRunContext) -> dg.DagsterRun:
        run = context.dagster_run
        if run.status == dg.DagsterRunStatus.NOT_STARTED and self.has_room():
            self._instance.launch_run(run.run_id, context.workspace)
            launched = self._instance.get_run_by_id(run.run_id)
            assert launched is not None
            return launched
        return super().submit_run(context)

    def has_room(self) -> bool:
        """Nothing queued, and fewer runs in progress than the limit."""
        queue = self._instance.get_concurrency_config().run_queue_config
        if queue is None or queue.tag_concurrency_limits:
            return False
        runs = self._instance.get_runs(filters=dg.RunsFilter(statuses=BUSY))
        if any(r.status == dg.DagsterRunStatus.QUEUED for r in runs):
            return False
        return queue.max_concurrent_runs == -1 or len(runs) < queue.max_concurrent_runs
