"""Sensors: RabbitMQ change events -> scoped runs; audit findings -> scoped repair runs."""

import time
from datetime import UTC, datetime
from typing import cast

import dagster as dg

from llm_twin_features.defs.assets import FEATURE_STORE_POOL, RAW, run_scope, scoped_run_config
from llm_twin_features.defs.checks import REPAIR_IDS_KEY, WAREHOUSE_AUDIT
from llm_twin_features.defs.jobs import (
    PIPELINE_JOBS,
    audit_job,
    audit_repair_job,
    warehouse_events_job,
)
from llm_twin_features.defs.resources import EventBrokerResource
from llm_twin_features.events.planning import Batch, SensorCursor, plan_tick
from llm_twin_features.runtime.dead_runs import release_dead_runs
from llm_twin_features.settings import Settings
from llm_twin_features.stores.queue import BrokerUnavailable, EventInbox

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


def build_sensor(settings: Settings) -> dg.SensorDefinition:
    @dg.sensor(
        name="warehouse_events_sensor",
        job=warehouse_events_job,
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Drains warehouse change events from RabbitMQ and requests one run per "
        "data type scoped to the changed documents. A message is acked only once the run "
        "that covers it exists; poison messages go to the dead-letter queue.",
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
            with EventInbox(event_broker.config()) as inbox:
                for warning in set(inbox.warnings) - _warned:  # once per process
                    _warned.add(warning)
                    context.log.warning(warning)
                budget = settings.sensor_time_budget_seconds
                settle = settings.sensor_settle_seconds
                deliveries = inbox.drain(settings.sensor_max_events, budget, settle=settle)
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


ALL_DOCUMENTS = frozenset({"*"})  # a whole-partition run covers every document
IN_FLIGHT = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _covered_since(instance: dg.DagsterInstance, since: float) -> dict[str, frozenset[str]]:
    """Documents that pipeline runs in flight, or that succeeded since `since`, take care of:
    what the audit saw drifting there was work in progress (e.g. events), not lost work."""
    finished_since = datetime.fromtimestamp(since, tz=UTC)
    records = [
        *instance.get_run_records(dg.RunsFilter(statuses=IN_FLIGHT)),
        *instance.get_run_records(
            dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS], updated_after=finished_since)
        ),
    ]
    covered: dict[str, frozenset[str]] = {}
    for record in records:
        run = record.dagster_run
        data_type = run.tags.get("dagster/partition")
        ui_materialization = RAW in (run.asset_selection or ())
        if data_type is None or not (run.job_name in PIPELINE_JOBS or ui_materialization):
            continue
        ids = run_scope(run.run_config)
        if ids is None:
            covered[data_type] = ALL_DOCUMENTS
        elif covered.get(data_type) is not ALL_DOCUMENTS:
            covered[data_type] = covered.get(data_type, frozenset()) | frozenset(ids)
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
    repair = {
        data_type: [i for i in ids if i not in covered.get(data_type, ())]
        for data_type, ids in found.items()
        if covered.get(data_type) is not ALL_DOCUMENTS
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
    return dg.Definitions(sensors=[build_sensor(Settings()), audit_repair_sensor])
