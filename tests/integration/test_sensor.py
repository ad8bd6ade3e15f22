"""The RabbitMQ sensor, evaluated with `build_sensor_context` on a persistent test instance,
against the real broker and the embedded stores. Requested runs are executed in-process the
way the daemon would launch them (same run key, config and tags)."""

from __future__ import annotations

import dataclasses
import json

import dagster as dg
import pytest

from llm_twin_features import cli
from llm_twin_features.definitions import build_definitions
from llm_twin_features.defs.assets import run_scope
from llm_twin_features.defs.jobs import FEATURE_PIPELINE_JOB, WAREHOUSE_EVENTS_JOB
from llm_twin_features.defs.resources import EventBrokerResource
from llm_twin_features.stores.queue import POISON_REASON_HEADER, EventInbox, EventPublisher

from ..conftest import SAMPLE_CORPUS

POST_IDS = ["566bf9d7-c55a-45f8-91a6-e55e9b9b1325", "857ce06b-f9a2-4be1-b55c-ca5db3c7b88e"]


class SensorHarness:
    def __init__(self, instance: dg.DagsterInstance, broker) -> None:
        self.instance = instance
        self.broker = broker
        self.defs = build_definitions()
        self.sensor = self.defs.resolve_sensor_def("warehouse_events_sensor")
        self.cursor: str | None = None

    def tick(self, broker=None, cursor: str | None = ...) -> dg.SensorResult:
        resources = self.defs.get_repository_def().get_top_level_resources()
        if broker is not None:
            resources = {
                **resources,
                "event_broker": EventBrokerResource(port=broker.port, queue=broker.queue),
            }
        context = dg.build_sensor_context(
            instance=self.instance,
            cursor=self.cursor if cursor is ... else cursor,
            definitions=self.defs,
            resources=resources,
        )
        return self.sensor.evaluate_tick(context)

    def launch(self, result) -> list[str]:
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
        self.cursor = result.cursor
        return run_ids

    def depth(self) -> int:
        with EventInbox(self.broker) as inbox:
            return inbox.depth()


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
    assert harness.depth() == 3  # read, not acked: the tick ended with them unacked

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


def test_interrupted_tick_loses_no_event(harness):
    """The tick reads the events, then dies before any run is submitted (its result and
    cursor are lost). The next tick, from the last saved cursor, still covers every event."""
    edit_posts(" Interrupted-tick marker: quokka.")
    lost = harness.tick()
    assert len(lost.run_requests) == 1  # ...and then the process dies: nothing submitted

    retried = harness.tick()  # harness.cursor was never advanced
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
