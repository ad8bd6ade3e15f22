"""Sensors: RabbitMQ change events -> scoped runs; audit findings -> scoped repair runs."""

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

import dagster as dg

from llm_twin_features.defs.assets import (
    FEATURE_STORE_POOL,
    RAW,
    run_scope,
    run_shard,
    scoped_run_config,
)
from llm_twin_features.defs.checks import REPAIR_IDS_KEY, WAREHOUSE_AUDIT
from llm_twin_features.defs.jobs import (
    PIPELINE_JOBS,
    audit_job,
    audit_repair_job,
    warehouse_events_job,
)
from llm_twin_features.defs.resources import EventBrokerResource
from llm_twin_features.domain.shards import Shard
from llm_twin_features.events.planning import Batch, SensorCursor, plan_tick
from llm_twin_features.runtime.dead_runs import release_dead_runs
from llm_twin_features.settings import Settings
from llm_twin_features.stores.queue import BrokerUnavailable, kept_inbox

RUN_KEY_TAG = "dagster/run_key"
_warned: set[str] = set()  # topology warnings already in a tick's log


def run_request(batch: Batch) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=batch.run_key,
        partition_key=batch.data_type,
        run_config=scoped_run_config(batch.entry_ids),
        tags={
            "llm_twin/events": str(len(batch.event_ids)),
            "llm_twin/documents": str(len(batch.entry_ids)),
            "llm_twin/oldest_event": batch.oldest_event,
        },
    )


EVENTS_SENSOR = "warehouse_events_sensor"


def events_sensor_names(consumers: int) -> list[str]:
    """`warehouse_events_sensor`, then `warehouse_events_sensor_2`... one per consumer."""
    return [EVENTS_SENSOR] + [f"{EVENTS_SENSOR}_{n}" for n in range(2, consumers + 1)]


def build_sensors(settings: Settings) -> list[dg.SensorDefinition]:
    """The change-event sensors: `settings.sensor_consumers` of them take turns on the queue.

    Dagster starts a sensor's tick at most every 5 s (its sensor daemon's loop), and a tick
    that took an event ends early so that its run starts: alone, a sensor would leave the
    queue unwatched until its next tick, and an event landing then would wait for it. The
    daemon evaluates the next sensor right after (or beside it, with `use_threads`), whose tick
    watches the queue meanwhile. Each keeps its RabbitMQ connection open between ticks
    (`kept_inbox`), so the messages it read stay its own until the run covering them exists:
    the other sensors never take them for new events."""
    names = events_sensor_names(settings.sensor_consumers)
    return [build_sensor(settings, name, len(names)) for name in names]


def build_sensor(settings: Settings, name: str, consumers: int) -> dg.SensorDefinition:
    @dg.sensor(
        name=name,
        job=warehouse_events_job,
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Drains warehouse change events from RabbitMQ and requests one run per "
        "data type scoped to the changed documents. A message is acked only once the run "
        "that covers it exists; poison messages go to the dead-letter queue. "
        f"One of {consumers} sensors that take turns on the queue, so that an event does not "
        "wait for the next tick of a sensor whose tick just ended.",
    )
    def warehouse_events_sensor(
        context: dg.SensorEvaluationContext, event_broker: EventBrokerResource
    ):
        started = time.monotonic()
        cursor = SensorCursor.loads(context.cursor)
        for run_id in release_dead_runs(context.instance, [FEATURE_STORE_POOL]):
            context.log.warning(f"released the pool slot of run {run_id}: its process is gone")

        def run_exists(run_key: str) -> bool:
            runs = context.instance.get_runs(
                filters=dg.RunsFilter(tags={RUN_KEY_TAG: run_key}), limit=1
            )
            return bool(runs)

        try:
            with kept_inbox(name, event_broker.config()) as inbox:
                for warning in set(inbox.warnings) - _warned:  # once per process
                    _warned.add(warning)
                    context.log.warning(warning)
                budget = settings.sensor_time_budget_seconds
                settle = settings.sensor_settle_seconds
                held = list(inbox.held.values())  # read by earlier ticks, not acked yet
                deliveries = held + inbox.drain(
                    settings.sensor_max_events - len(held), budget, settle=settle
                )
                plan = plan_tick(deliveries, cursor, run_exists)
                if not plan.new_events and not plan.dead_letter:
                    # Only known events so far: wait (long poll) for a new one, so an event
                    # published between two ticks does not wait for the next one.
                    deliveries += inbox.drain(
                        settings.sensor_max_events - len(deliveries),
                        budget - (time.monotonic() - started),
                        wait=settings.sensor_long_poll_seconds,
                        settle=settle,
                    )
                    plan = plan_tick(deliveries, cursor, run_exists)
                for delivery, reason in plan.dead_letter:
                    context.log.warning(f"dead-lettered a poison message: {reason}")
                    inbox.dead_letter(delivery, reason)
                inbox.ack(plan.ack)
        except BrokerUnavailable as error:
            # Nothing was acked: the events wait in the queue for a later tick.
            return dg.SkipReason(f"skipped: {error}. The sensor retries on its next tick.")

        if plan.new_events or plan.ack or plan.dead_letter:
            context.log.info(
                f"{len(deliveries)} messages: {plan.new_events} new events in "
                f"{len(plan.requests)} pending batches, {len(plan.ack)} acked, "
                f"{len(plan.dead_letter)} dead-lettered ({time.monotonic() - started:.2f} s)"
            )
        if not plan.requests:
            return dg.SensorResult(
                skip_reason=dg.SkipReason("no new warehouse events"), cursor=plan.cursor.dumps()
            )
        return dg.SensorResult(
            run_requests=[run_request(b) for b in plan.requests], cursor=plan.cursor.dumps()
        )

    return warehouse_events_sensor


IN_FLIGHT = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


@dataclass
class Coverage:
    """The documents of one data type that pipeline runs take care of: all of them (a
    whole-partition run), some shards of them, or these ids."""

    whole: bool = False
    shards: list[Shard] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)

    def holds(self, document_id: str) -> bool:
        return (
            self.whole
            or document_id in self.ids
            or any(shard.holds(document_id) for shard in self.shards)
        )


def _covered_since(instance: dg.DagsterInstance, since: float) -> dict[str, Coverage]:
    """Documents that pipeline runs in flight, or that succeeded since `since`, take care of:
    what the audit saw drifting there was work in progress (e.g. events), not lost work."""
    finished_since = datetime.fromtimestamp(since, tz=UTC)
    records = [
        *instance.get_run_records(dg.RunsFilter(statuses=IN_FLIGHT)),
        *instance.get_run_records(
            dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS], updated_after=finished_since)
        ),
    ]
    covered: dict[str, Coverage] = {}
    for record in records:
        run = record.dagster_run
        data_type = run.tags.get("dagster/partition")
        ui_materialization = RAW in (run.asset_selection or ())
        if data_type is None or not (run.job_name in PIPELINE_JOBS or ui_materialization):
            continue
        coverage = covered.setdefault(data_type, Coverage())
        ids, shard = run_scope(run.run_config), run_shard(run.run_config)
        if ids is not None:
            coverage.ids.update(ids)
        elif shard is not None:
            coverage.shards.append(Shard.parse(shard))
        else:
            coverage.whole = True
    return covered


@dg.run_status_sensor(
    name="audit_repair_sensor",
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[audit_job],
    request_job=audit_repair_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After each audit, requests one run per drifted data type, scoped to the "
    "drifted documents (capped by the audit's repair_cap).",
)
def audit_repair_sensor(context: dg.RunStatusSensorContext):
    run_id = context.dagster_run.run_id
    records = context.instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
    ).records
    found: dict[str, list[str]] = {}
    for record in records:
        # Filtered on ASSET_CHECK_EVALUATION above: each record holds such a Dagster event.
        evaluation = cast(
            "dg.AssetCheckEvaluation",
            record.event_log_entry.get_dagster_event().event_specific_data,
        )
        if evaluation.check_name == WAREHOUSE_AUDIT:
            # checks.py writes it as MetadataValue.json({data_type: [document ids]})
            found = cast("dict[str, list[str]]", evaluation.metadata[REPAIR_IDS_KEY].value)
    (audit_record,) = context.instance.get_run_records(dg.RunsFilter(run_ids=[run_id]))
    covered = _covered_since(context.instance, audit_record.start_time or 0.0)
    nothing = Coverage()
    repair = {
        data_type: [i for i in ids if not covered.get(data_type, nothing).holds(i)]
        for data_type, ids in found.items()
    }
    repair = {data_type: ids for data_type, ids in repair.items() if ids}
    if not repair:
        return dg.SkipReason(
            f"audit run {run_id} found no drift that runs in flight do not already cover"
        )
    return [
        dg.RunRequest(
            run_key=f"repair-{run_id}-{data_type}",
            partition_key=data_type,
            run_config=scoped_run_config(ids),
            tags={"llm_twin/audit_run": run_id, "llm_twin/documents": str(len(ids))},
        )
        for data_type, ids in repair.items()
    ]


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(sensors=[*build_sensors(Settings()), audit_repair_sensor])
