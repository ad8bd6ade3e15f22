"""The RabbitMQ sensor: turns warehouse change events into runs scoped to the changed ids."""

import time

import dagster as dg

from llm_twin_features.assets import ScopeConfig, feature_assets
from llm_twin_features.event_sync import Batch, SensorCursor, plan_tick
from llm_twin_features.resources import EventBrokerResource
from llm_twin_features.settings import Settings
from llm_twin_features.stores.queue import BrokerUnavailable, EventInbox

WAREHOUSE_EVENTS_JOB = "warehouse_events_job"
RUN_KEY_TAG = "dagster/run_key"

warehouse_events_job = dg.define_asset_job(
    WAREHOUSE_EVENTS_JOB,
    selection=dg.AssetSelection.assets(*feature_assets),
    description="Near-real-time sync: the four stages for the document ids of a batch of "
    "warehouse change events (requested by warehouse_events_sensor).",
    tags={"llm_twin/trigger": "events"},
)


def run_request(batch: Batch) -> dg.RunRequest:
    scope = ScopeConfig(document_ids=batch.entry_ids)
    return dg.RunRequest(
        run_key=batch.run_key,
        partition_key=batch.data_type,
        run_config=dg.RunConfig(ops={asset.key.path[-1]: scope for asset in feature_assets}),
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

        def run_exists(run_key: str) -> bool:
            runs = context.instance.get_runs(
                filters=dg.RunsFilter(tags={RUN_KEY_TAG: run_key}), limit=1
            )
            return bool(runs)

        try:
            with EventInbox(event_broker.config()) as inbox:
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
