"""The RabbitMQ sensor, evaluated with `build_sensor_context` on a persistent test instance,
against the real broker and the embedded stores. Requested runs are executed in-process the
way the daemon would launch them (same run key, config and tags)."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import dagster as dg
import pytest

from llm_twin_features import cli
from llm_twin_features.definitions import build_definitions
from llm_twin_features.defs.assets import run_scope
from llm_twin_features.defs.jobs import FEATURE_PIPELINE_JOB, WAREHOUSE_EVENTS_JOB
from llm_twin_features.defs.resources import EventBrokerResource
from llm_twin_features.defs.sensors import EVENTS_SENSOR
from llm_twin_features.stores.queue import (
    POISON_REASON_HEADER,
    EventInbox,
    EventPublisher,
    close_kept_inboxes,
    held_messages,
)

from ..conftest import SAMPLE_CORPUS

POST_IDS = ["566bf9d7-c55a-45f8-91a6-e55e9b9b1325", "857ce06b-f9a2-4be1-b55c-ca5db3c7b88e"]


class SensorHarness:
    def __init__(self, instance: dg.DagsterInstance, broker) -> None:
        self.instance = instance
        self.broker = broker
        self.defs = build_definitions()
        self.cursors: dict[str, str | None] = {}  # by sensor name, as the daemon keeps them

    def tick(
        self, broker=None, cursor: str | None = ..., sensor: str = EVENTS_SENSOR
    ) -> dg.SensorResult:
        resources = self.defs.get_repository_def().get_top_level_resources()
        if broker is not None:
            resources = {
                **resources,
                "event_broker": EventBrokerResource(port=broker.port, queue=broker.queue),
            }
        context = dg.build_sensor_context(
            instance=self.instance,
            cursor=self.cursors.get(sensor) if cursor is ... else cursor,
            definitions=self.defs,
            resources=resources,
        )
        return self.defs.resolve_sensor_def(sensor).evaluate_tick(context)

    def launch(self, result, sensor: str = EVENTS_SENSOR) -> list[str]:
        """What the daemon does with a tick's run requests."""
        job = self.defs.resolve_job_def(WAREHOUSE_EVENTS_JOB)
        run_ids = []
        for request in result.run_requests:
            if self.instance.get_runs(
                filters=dg.RunsFilter(tags={"dagster/run_key": request.run_key}), limit=1
            ):
                continue  # the daemon skips a run key that already has a run
            outcome = job.execute_in_process(
                instance=self.instance,
                partition_key=request.partition_key,
                run_config=request.run_config,
                tags={**request.tags, "dagster/run_key": request.run_key},
            )
            assert outcome.success
            run_ids.append(outcome.run_id)
        self.cursors[sensor] = result.cursor
        return run_ids

    def depth(self) -> int:
        """Messages not acked yet: in the queue, or held by the sensors' open inboxes."""
        with EventInbox(self.broker) as inbox:
            return inbox.depth() + held_messages(self.broker)


@pytest.fixture
def harness(data_dir, broker, monkeypatch):
    monkeypatch.setenv("SENSOR_LONG_POLL_SECONDS", "0.3")
    assert cli.main(["ingest", "--no-publish", str(SAMPLE_CORPUS)]) == 0
    with dg.instance_for_test() as instance:
        job = build_definitions().resolve_job_def(FEATURE_PIPELINE_JOB)
        for data_type in ("posts", "articles"):
            assert job.execute_in_process(instance=instance, partition_key=data_type).success
        yield SensorHarness(instance, broker)


def edit_posts(suffix: str) -> None:
    """Appends to the sample posts' text through the CLI, which publishes one event each."""
    import tempfile

    from llm_twin_features.cli.common import warehouse_of as _warehouse
    from llm_twin_features.settings import Settings

    with _warehouse(Settings()) as warehouse:
        posts = [warehouse.documents("posts").get(i) for i in POST_IDS]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as handle:
        for post in posts:
            text = post["content"]["text"] + suffix
            handle.write(json.dumps({**post, "type": "posts", "content": {"text": text}}) + "\n")
    assert cli.main(["ingest", handle.name]) == 0


def scope(request: dg.RunRequest) -> list[str]:
    return run_scope(request.run_config)


def status() -> dict[str, dict]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["status", "--json"]) == 0
    return {row["type"]: row for row in map(json.loads, out.getvalue().splitlines())}


def search_top(query: str, data_type: str) -> dict:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(["search", query, "--type", data_type, "--json", "--limit", "1"])
    return json.loads(out.getvalue())


def test_events_become_scoped_run_requests_and_are_acked_after_the_runs(harness):
    edit_posts(" Update: a zebra-striped retrieval trick.")
    article = "0c67a2cb-603c-4616-b7a2-2873705bdd12"
    assert cli.main(["delete", article, "--type", "articles"]) == 0
    assert harness.depth() == 3

    first = harness.tick()
    requests = {r.partition_key: r for r in first.run_requests}
    assert set(requests) == {"posts", "articles"}
    assert sorted(scope(requests["posts"])) == sorted(POST_IDS)
    assert scope(requests["articles"]) == [article]
    assert requests["posts"].tags["llm_twin/events"] == "2"
    assert requests["posts"].run_key.startswith("events-posts-")
    assert "llm_twin/oldest_event" in requests["posts"].tags
    assert harness.depth() == 3  # read, not acked: the sensor holds them

    # Re-evaluating before the runs exist requests the same runs (a no-op for the daemon).
    again = harness.tick(cursor=first.cursor)
    assert {r.run_key for r in again.run_requests} == {r.run_key for r in first.run_requests}

    assert len(harness.launch(first)) == 2
    assert harness.launch(harness.tick()) == []  # redelivered events are covered: acked
    assert harness.depth() == 0
    assert harness.tick().run_requests == []

    rows = status()
    assert rows["posts"]["in_sync"] and rows["articles"]["in_sync"]
    assert rows["articles"]["cleaned"] == 19
    assert "zebra-striped" in search_top("zebra-striped retrieval trick", "posts")["text"]


def test_sensors_take_turns_and_never_take_each_others_events(harness):
    """Two event sensors take turns on the queue (Dagster's daemon evaluates them one after
    the other). The events one sensor read stay its own until their run exists, so the other,
    ticking meanwhile, requests no second run for them; an event published meanwhile is the
    other's. On the code before there was one sensor, and a tick's unacked messages went back
    to the queue when it ended: a second sensor ticking next would have taken them for new
    events and requested a second run."""
    second = f"{EVENTS_SENSOR}_2"
    edit_posts(" Turn-taking marker: axolotl.")
    first = harness.tick()
    assert len(first.run_requests) == 1
    assert harness.tick(sensor=second).run_requests == []  # before the run exists
    assert len(harness.launch(first)) == 1
    assert harness.tick(sensor=second).run_requests == []  # after

    article = "0c67a2cb-603c-4616-b7a2-2873705bdd12"
    assert cli.main(["delete", article, "--type", "articles"]) == 0
    taken = harness.tick(sensor=second)  # the first sensor's tick has ended: the second's turn
    assert [scope(r) for r in taken.run_requests] == [[article]]
    assert len(harness.launch(taken, sensor=second)) == 1
    assert harness.depth() == 3  # both runs exist; each sensor acks its own on its next tick
    for sensor in (EVENTS_SENSOR, second, EVENTS_SENSOR, second):
        assert harness.launch(harness.tick(sensor=sensor), sensor=sensor) == []
    assert harness.depth() == 0
    event_runs = harness.instance.get_runs(dg.RunsFilter(job_name=WAREHOUSE_EVENTS_JOB))
    assert len(event_runs) == 2
    assert "axolotl" in search_top("turn-taking marker axolotl", "posts")["text"]


def test_a_sensor_process_gone_returns_its_held_events_to_the_queue(harness):
    """The code server holding a sensor's open connection stops (or the broker drops that
    connection) after a tick read events: they go back to the queue, and whichever sensor
    ticks next covers them: by the pending batch in its cursor, or, for another sensor, by
    the run that exists under the same run key (the same events). Nothing is lost, and no
    second run is requested."""
    edit_posts(" Restart marker: pangolin.")
    first = harness.tick()
    assert held_messages(harness.broker) == 2
    close_kept_inboxes()  # the process is gone: its connection closes
    assert held_messages(harness.broker) == 0 and harness.depth() == 2
    assert [r.run_key for r in harness.tick().run_requests] == [
        r.run_key for r in first.run_requests
    ]  # redelivered, still pending in its cursor: the same run
    harness.launch(first)
    second = f"{EVENTS_SENSOR}_2"
    close_kept_inboxes()
    assert harness.tick(sensor=second).run_requests == []  # new to it, but their run exists
    assert harness.depth() == 0
    assert "pangolin" in search_top("restart marker pangolin", "posts")["text"]
    assert status()["posts"]["in_sync"]


def test_a_stopped_sensors_held_events_go_to_the_other_one(harness, monkeypatch):
    """A sensor switched off in the UI ticks no more, with the events it read held on its
    open connection. The other sensor's first tick after `KEPT_IDLE_SECONDS` closes that
    connection: the events go back to the queue, and it acks them (their run exists) rather
    than leaving them until the broker drops the silent connection, minutes later."""
    from llm_twin_features.stores import queue

    monkeypatch.setattr(queue, "KEPT_IDLE_SECONDS", 0.5)
    second = f"{EVENTS_SENSOR}_2"
    edit_posts(" Stopped-sensor marker: okapi.")
    first = harness.tick()
    assert harness.tick(sensor=second).run_requests == []  # moments later: the first's
    harness.launch(first)  # ...and the first sensor is switched off: it ticks no more
    time.sleep(0.6)
    assert harness.tick(sensor=second).run_requests == []
    assert harness.depth() == 0
    assert len(harness.instance.get_runs(dg.RunsFilter(job_name=WAREHOUSE_EVENTS_JOB))) == 1


def test_a_connection_the_broker_dropped_between_ticks_is_reopened_by_the_next(harness):
    """The broker drops a sensor's kept connection between two of its ticks (a broker
    restart, a heartbeat timeout): the next tick opens a new one at once instead of failing
    on the dead one (a skipped tick), and the events the old one held come back to it."""
    from ..e2e.test_faults import drop_connections

    edit_posts(" Dropped-between-ticks marker: tapir.")
    first = harness.tick()
    assert held_messages(harness.broker) == 2
    assert drop_connections([os.getpid()], harness.broker.port) == 1
    again = harness.tick()
    assert "RabbitMQ" not in (again.skip_message or "")
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in first.run_requests]
    harness.launch(again)
    harness.launch(harness.tick())
    assert harness.depth() == 0


def test_interrupted_tick_loses_no_event(harness):
    """The tick reads the events, then dies before any run is submitted (its result and
    cursor are lost). The next tick, from the last saved cursor, still covers every event."""
    edit_posts(" Interrupted-tick marker: quokka.")
    lost = harness.tick()
    assert len(lost.run_requests) == 1  # ...and then the process dies: nothing submitted

    retried = harness.tick()  # the sensor's cursor was never advanced
    assert [r.run_key for r in retried.run_requests] == [r.run_key for r in lost.run_requests]
    harness.launch(retried)
    harness.launch(harness.tick())
    assert harness.depth() == 0
    assert "quokka" in search_top("interrupted tick marker quokka", "posts")["text"]
    assert status()["posts"]["in_sync"]


def test_poison_goes_to_the_dead_letter_queue_and_valid_events_go_on(harness):
    with EventPublisher(harness.broker) as publisher:
        publisher._publish("", harness.broker.queue, b"{broken")
        publisher._publish(
            "", harness.broker.queue, json.dumps({"type": "users", "entry_id": "u"}).encode()
        )
    edit_posts(" Poison neighbour.")

    result = harness.tick()
    assert len(result.run_requests) == 1
    with EventInbox(harness.broker) as inbox:
        reasons = []
        while True:
            method, properties, _ = inbox.channel.basic_get(
                harness.broker.dead_letter_queue, auto_ack=True
            )
            if method is None:
                break
            reasons.append(properties.headers[POISON_REASON_HEADER])
    assert len(reasons) == 2
    assert reasons[0].startswith("invalid JSON") and "unknown type 'users'" in reasons[1]
    harness.launch(result)
    harness.launch(harness.tick())
    assert harness.depth() == 0


def test_unreachable_broker_skips_the_tick_and_the_sensor_recovers(harness):
    edit_posts(" Recovery marker.")
    down = harness.tick(broker=dataclasses.replace(harness.broker, port=1))
    assert down.run_requests == []
    assert "RabbitMQ at amqp://127.0.0.1:1 unreachable" in down.skip_message
    assert "retries on its next tick" in down.skip_message
    assert harness.depth() == 2  # nothing was lost

    recovered = harness.tick()
    assert len(recovered.run_requests) == 1
