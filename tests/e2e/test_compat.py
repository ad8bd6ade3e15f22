"""Drop-in replacement for the original LLM Twin feature pipeline (issue 10): its neighbours,
as REFERENCE.md ("The original's neighbours") describes them, run against this project.

- The original CDC publisher: its own connection per message, `queue_declare(queue,
  durable=True)` with no arguments, publisher confirms, persistent messages; the body is the
  inserted document minus `_id`, plus `type` and `entry_id` (no `op`, no event id).
- The retriever: searches each `vector_{type}` (one unnamed 384-d cosine vector) with
  `limit=k // 3`, optionally filtered on `author_id` (`owner_id` for repositories), and reads
  the chunk text from `hit.payload["content"]`.
- The dataset builder: `scroll(collection_name="cleaned_articles" | "cleaned_repositories",
  limit=10000)`, reading `payload["cleaned_content"]`.

Real RabbitMQ, the embedded stores, the bundled model; the events sensor is evaluated and its
runs executed in-process the way the daemon does it (tests/integration/test_sensor.py's harness).
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pika
import pika.exceptions
import pytest
from qdrant_client import QdrantClient, models

from llm_twin_features import cli
from llm_twin_features.defs.assets import run_scope
from llm_twin_features.defs.jobs import WAREHOUSE_EVENTS_JOB
from llm_twin_features.defs.sensors import EVENTS_SENSOR
from llm_twin_features.domain.data_types import data_types
from llm_twin_features.events.schema import ChangeEvent
from llm_twin_features.pipeline.embedders import EmbeddingDispatcher
from llm_twin_features.settings import Settings
from llm_twin_features.stores.feature_store import Point
from llm_twin_features.stores.queue import (
    BrokerConfig,
    EventInbox,
    EventPublisher,
    close_kept_inboxes,
)

from ..conftest import STORE_VARIABLES, sample_documents
from ..integration.test_sensor import SensorHarness, search_top, status
from .test_pipeline_e2e import Harness

VALID = {"posts": 30, "articles": 20, "repositories": 12}  # of the sample corpus
AUTHOR_KEY = {"posts": "author_id", "articles": "author_id", "repositories": "owner_id"}


# --- the neighbours -----------------------------------------------------------------------------


def original_cdc_publish(broker: BrokerConfig, data_type: str, document: dict) -> bytes:
    """One insert published exactly as the original CDC does it. (The original only logs a
    failed publish, so its event is lost; here the error fails the test.)"""
    data = {k: v for k, v in document.items() if k != "_id"}
    data["type"] = data_type
    data["entry_id"] = str(document["_id"])
    body = json.dumps(data)
    connection = pika.BlockingConnection(pika.ConnectionParameters(broker.host, broker.port))
    try:
        channel = connection.channel()
        channel.queue_declare(queue=broker.queue, durable=True)
        channel.confirm_delivery()
        channel.basic_publish(
            exchange="",
            routing_key=broker.queue,
            body=body,
            properties=pika.BasicProperties(delivery_mode=2),
        )
    finally:
        if connection.is_open:
            connection.close()
    return body.encode()


def retriever_search(
    client: QdrantClient, data_type: str, vector: list[float], k: int, author: str | None = None
) -> list[models.ScoredPoint]:
    """The retriever's search of one collection. qdrant-client 1.20 no longer has `search`
    (`query_vector=`); `query_points` is the same request under its current name."""
    query_filter = None
    if author is not None:
        query_filter = models.Filter(
            must=[
                models.FieldCondition(
                    key=AUTHOR_KEY[data_type], match=models.MatchValue(value=str(author))
                )
            ]
        )
    return client.query_points(
        collection_name=f"vector_{data_type}",
        query=vector,
        query_filter=query_filter,
        limit=k // 3,
    ).points


# --- observing the sensor ----------------------------------------------------------------------


class AckRecorder:
    """Which message bodies the sensor acked, and how often."""

    def __init__(self, env: pytest.MonkeyPatch) -> None:
        self.acked: Counter[bytes] = Counter()
        self._bodies: dict[tuple[int, int], bytes] = {}
        drain, ack = EventInbox.drain, EventInbox.ack
        recorder = self

        def recording_drain(inbox, *args, **kwargs):
            deliveries = drain(inbox, *args, **kwargs)
            for delivery in deliveries:
                recorder._bodies[(id(inbox), delivery.delivery_tag)] = delivery.body
            return deliveries

        def recording_ack(inbox, delivery_tags):
            tags = list(delivery_tags)
            ack(inbox, tags)
            for tag in tags:
                recorder.acked[recorder._bodies.pop((id(inbox), tag))] += 1

        env.setattr(EventInbox, "drain", recording_drain)
        env.setattr(EventInbox, "ack", recording_ack)


def sync_through_sensor(harness: SensorHarness, max_ticks: int = 8) -> list:
    """Ticks and launches the requested runs until the queue is empty and nothing is pending."""
    results = []
    for _ in range(max_ticks):
        result = harness.tick()
        results.append(result)
        harness.launch(result)
        if not result.run_requests and harness.depth() == 0:
            return results
    pytest.fail(f"not in sync after {max_ticks} ticks: {[r.skip_message for r in results]}")


def event_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return instance.get_runs(filters=dg.RunsFilter(job_name=WAREHOUSE_EVENTS_JOB))


def dead_lettered(broker: BrokerConfig) -> int:
    with EventInbox(broker) as inbox:
        declared = inbox.channel.queue_declare(broker.dead_letter_queue, passive=True)
    return declared.method.message_count


def delete_topology(broker: BrokerConfig) -> None:
    connection = pika.BlockingConnection(pika.ConnectionParameters(broker.host, broker.port))
    channel = connection.channel()
    channel.queue_delete(broker.queue)
    channel.queue_delete(broker.dead_letter_queue)
    channel.exchange_delete(broker.dead_letter_exchange)
    connection.close()


def ingest(documents: list[dict], publish: bool = False) -> None:
    """Documents into the warehouse: by default as the crawlers write them (no event of ours);
    with `publish`, through our `ingest`, which publishes one event each."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "documents.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in documents))
        assert cli.main(["ingest", str(path), *([] if publish else ["--no-publish"])]) == 0


def crawled(marker: str) -> list[tuple[str, dict]]:
    """New documents shaped as the course's crawlers write them (`_id` a uuid4 string, an
    article `Subtitle` of None, repository content keyed by file paths)."""
    return [
        (
            "posts",
            {
                "_id": str(uuid.uuid4()),
                "platform": "linkedin",
                "content": {"text": f"Our {marker} retriever reranks chunks.", "image": None},
                "author_id": "course-author",
            },
        ),
        (
            "articles",
            {
                "_id": str(uuid.uuid4()),
                "platform": "medium",
                "link": f"https://medium.com/@course/{marker}",
                "content": {
                    "Title": f"The {marker} feature pipeline",
                    "Subtitle": None,
                    "Content": f"A {marker} article on streaming features into Qdrant.",
                    "language": "en",
                },
                "author_id": "course-author",
            },
        ),
        (
            "repositories",
            {
                "_id": str(uuid.uuid4()),
                "name": f"{marker}-repo",
                "link": f"https://github.com/course/{marker}-repo",
                "content": {
                    "README.md": f"# {marker}\nThe {marker} repository.",
                    "src/app.py": f"def {marker}():\n    return 'hello'\n",
                },
                "owner_id": "course-author",
            },
        ),
    ]


# --- (a) the original CDC's events, with the queue declared by either side first ----------------


@pytest.fixture
def sensor(data_dir, broker, monkeypatch) -> Iterator[SensorHarness]:
    monkeypatch.setenv("SENSOR_LONG_POLL_SECONDS", "0.3")
    with dg.instance_for_test() as instance:
        yield SensorHarness(instance, broker)


def test_original_cdc_events_after_our_sensor_declared_the_queue(sensor, broker, monkeypatch):
    recorder = AckRecorder(monkeypatch)
    documents = crawled("ocelot")
    ingest([{"type": t, **d} for t, d in documents])
    idle = sensor.tick()  # our sensor is first: it declares the queue
    assert idle.run_requests == [] and "no new warehouse events" in idle.skip_message
    sensor.cursors[EVENTS_SENSOR] = idle.cursor

    published = [original_cdc_publish(broker, t, d) for t, d in documents]
    published.append(original_cdc_publish(broker, *documents[0]))  # the same insert twice
    started = time.monotonic()

    first = sensor.tick()
    assert sorted(r.partition_key for r in first.run_requests) == sorted(data_types())
    for request in first.run_requests:
        (entry_id,) = run_scope(request.run_config)
        assert entry_id == dict(documents)[request.partition_key]["_id"]
    # The sensor's connection closes (its process restarted) while the runs do not exist yet:
    # the messages are redelivered, and the same runs are requested, no new one.
    close_kept_inboxes()
    again = sensor.tick()
    assert {r.run_key for r in again.run_requests} == {r.run_key for r in first.run_requests}
    results = sync_through_sensor(sensor)
    seconds = time.monotonic() - started

    launched = {r.run_key for r in results[0].run_requests}  # by sync_through_sensor
    assert launched == {r.run_key for r in first.run_requests}
    assert len(event_runs(sensor.instance)) == 3  # one per batch, none for a redelivery
    assert sensor.tick().run_requests == []
    assert recorder.acked == Counter(published)  # every message acked, once
    assert dead_lettered(broker) == 0 and sensor.depth() == 0
    rows = status()
    for data_type, document in documents:
        assert rows[data_type]["in_sync"], rows[data_type]
        hit = search_top(f"ocelot {data_type}", data_type)
        assert hit["document_id"] == document["_id"] and "ocelot" in hit["text"]
    print(
        f"COMPAT-FIGURES original CDC after our declare: {len(published)} messages, "
        f"{seconds:.1f} s to in sync and the queue empty"
    )


@pytest.fixture(scope="module")
def replaced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The sample corpus written by the crawlers and announced by the original CDC, which
    declared the queue before our sensor ever ran; our sensor then syncs the feature store."""
    data_dir = tmp_path_factory.mktemp("compat") / "data"
    broker = BrokerConfig(queue=f"test_compat_{uuid.uuid4().hex[:10]}")
    with pytest.MonkeyPatch.context() as env:
        for name in STORE_VARIABLES:
            env.delenv(name, raising=False)
        env.setenv("LLM_TWIN_DATA_DIR", str(data_dir))
        env.setenv("RABBITMQ_QUEUE", broker.queue)
        env.setenv("SENSOR_LONG_POLL_SECONDS", "0.3")
        recorder = AckRecorder(env)
        try:
            documents = sample_documents()
            ingest(documents)
            published = [
                original_cdc_publish(broker, d["type"], {k: v for k, v in d.items() if k != "type"})
                for d in documents
            ]
            started = time.monotonic()
            with dg.instance_for_test() as instance:
                harness = SensorHarness(instance, broker)
                first = harness.tick()
                reevaluated = harness.tick(cursor=None)  # a tick lost before its runs existed
                results = sync_through_sensor(harness)
                seconds = time.monotonic() - started
                print(
                    f"COMPAT-FIGURES original CDC before our declare: {len(published)} "
                    f"messages, {seconds:.1f} s to in sync and the queue empty"
                )
                yield {
                    "data_dir": data_dir,
                    "broker": broker,
                    "harness": harness,
                    "published": published,
                    "acked": recorder.acked,
                    "first": first,
                    "reevaluated": reevaluated,
                    "results": results,
                }
        finally:
            delete_topology(broker)


def test_original_cdc_events_before_our_sensor_declared_the_queue(replaced):
    harness, broker = replaced["harness"], replaced["broker"]
    first = replaced["first"]
    assert sorted(r.partition_key for r in first.run_requests) == sorted(data_types())
    assert sum(int(r.tags["llm_twin/events"]) for r in first.run_requests) == 67
    assert [r.run_key for r in replaced["reevaluated"].run_requests] == [
        r.run_key for r in first.run_requests
    ]
    assert len(event_runs(harness.instance)) == 3  # one run per batch
    assert harness.tick().run_requests == []  # nothing left, no new run
    assert replaced["acked"] == Counter(replaced["published"])  # each message acked once
    assert dead_lettered(broker) == 0 and harness.depth() == 0
    rows = status()
    for data_type in data_types():  # invalid documents are quarantined, not dead-lettered
        assert rows[data_type]["cleaned"] == VALID[data_type]
        assert rows[data_type]["in_sync"], rows[data_type]


# --- (b) the retriever, (c) the dataset builder --------------------------------------------------


@pytest.fixture
def qdrant(replaced) -> Iterator[QdrantClient]:
    client = QdrantClient(path=str(Path(replaced["data_dir"]) / "qdrant"))
    yield client
    client.close()


def authored(data_type: str, author: str) -> set[str]:
    return {
        d["_id"]
        for d in sample_documents()
        if d["type"] == data_type and d.get(AUTHOR_KEY[data_type]) == author
    }


@pytest.mark.parametrize(
    ("data_type", "query"),
    [
        ("posts", "prompt monitoring for LLM calls in production"),
        ("articles", "fine-tune a 7B model with QLoRA on a single GPU"),
        ("repositories", "fuse BM25 and dense results with reciprocal rank fusion"),
    ],
)
def test_retriever_searches_every_vector_collection_with_and_without_its_author_filter(
    replaced, qdrant, data_type, query
):
    params = qdrant.get_collection(f"vector_{data_type}").config.params.vectors
    assert isinstance(params, models.VectorParams)  # one unnamed vector
    assert (params.size, params.distance) == (384, models.Distance.COSINE)
    # The retriever embeds its query with the model alone (no instruction).
    embedder = EmbeddingDispatcher.embedder(data_type, Settings())
    vector = embedder.embed([query], query_instruction="")[0]
    k = 9

    hits = retriever_search(qdrant, data_type, vector, k)
    assert len(hits) == k // 3
    texts = [hit.payload["content"] for hit in hits]  # what the retriever reranks
    assert all(isinstance(text, str) and text.strip() for text in texts)

    for author in ("7c1e2f4a-9b3d-4e6f-8a1b-2c3d4e5f6a7b", "d94b6a21-5e7f-4c83-b2a9-0e1f3d5c7b9a"):
        filtered = retriever_search(qdrant, data_type, vector, k, author=author)
        assert len(filtered) == k // 3, (data_type, AUTHOR_KEY[data_type])
        assert {hit.payload["document_id"] for hit in filtered} <= authored(data_type, author)
        assert all(hit.payload["content"].strip() for hit in filtered)


@pytest.mark.parametrize("data_type", ["articles", "repositories"])
def test_dataset_builder_scrolls_the_cleaned_documents(replaced, qdrant, data_type):
    points, _ = qdrant.scroll(collection_name=f"cleaned_{data_type}", limit=10000)
    contents = [point.payload["cleaned_content"] for point in points]
    assert len(contents) == VALID[data_type]
    assert all(isinstance(content, str) and content.strip() for content in contents)


# --- a queue declared by an older version of this project ---------------------------------------


def test_queue_declared_by_an_older_version_still_works(sensor, broker, monkeypatch):
    """Older versions declared the queue with dead-letter arguments. The events queued there
    are processed, our producers go on publishing to it, and the sensor says what a producer
    that declares a plain durable queue meets there and how to switch; after the switch the
    original CDC publishes and is synced."""
    recorder = AckRecorder(monkeypatch)
    connection = pika.BlockingConnection(pika.ConnectionParameters(broker.host, broker.port))
    channel = connection.channel()  # what the older version declared
    channel.exchange_declare(broker.dead_letter_exchange, exchange_type="direct", durable=True)
    channel.queue_declare(
        broker.queue,
        durable=True,
        arguments={
            "x-dead-letter-exchange": broker.dead_letter_exchange,
            "x-dead-letter-routing-key": broker.queue,
        },
    )
    connection.close()
    (post, article, repository) = crawled("pangolin")
    ingest([{"type": post[0], **post[1]}])
    with EventPublisher(broker) as publisher:  # an event of ours, as the older version sent it
        publisher.publish([ChangeEvent(type=post[0], entry_id=post[1]["_id"], op="insert")])
        (warning,) = publisher.warnings
    assert "used as it is" in warning and "406 PRECONDITION_FAILED" in warning
    assert "rabbitmqctl delete_queue" in warning
    ingest([{"type": article[0], **article[1]}], publish=True)  # through the old queue

    results = sync_through_sensor(sensor)
    assert sorted(r.partition_key for r in results[0].run_requests) == ["articles", "posts"]
    assert status()["articles"]["in_sync"] and status()["posts"]["in_sync"]
    assert dead_lettered(broker) == 0 and sensor.depth() == 0

    # The original CDC cannot use that queue (the broker refuses its declare), as the warning
    # said; the switch it describes: queue drained (it is), deleted, declared plain again.
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="406"):
        original_cdc_publish(broker, *repository)
    connection = pika.BlockingConnection(pika.ConnectionParameters(broker.host, broker.port))
    connection.channel().queue_delete(broker.queue)
    connection.close()
    ingest([{"type": repository[0], **repository[1]}])
    body = original_cdc_publish(broker, *repository)
    results = sync_through_sensor(sensor)
    assert [r.partition_key for r in results[0].run_requests] == ["repositories"]
    assert recorder.acked[body] == 1
    assert status()["repositories"]["in_sync"] and dead_lettered(broker) == 0
    assert len(event_runs(sensor.instance)) == 3


# --- points written before the payload change --------------------------------------------------


def test_points_of_the_previous_payload_version_are_rewritten_without_reembedding(data_dir):
    """Version 1 stored the chunk text under `text` and no `owner_id`: such points are stale
    for the audit, and a run rewrites them with the vectors they have."""
    ingest([{"type": t, **d} for t, d in crawled("wombat")])
    with dg.instance_for_test() as instance:
        harness = Harness(data_dir, instance)
        for data_type in data_types():
            harness.run(data_type)
        with harness.feature_store() as store:  # back to the version 1 payloads
            for data_type in data_types():
                for collection in (f"vector_{data_type}", f"cleaned_{data_type}"):
                    points = list(store.points(collection, with_vectors=True))
                    for point in points:
                        payload = {k: v for k, v in point.payload.items() if k != "owner_id"}
                        if "content" in payload:
                            payload["text"] = payload.pop("content")
                        point.payload = {**payload, "pipeline_version": "1"}
                    store.upsert(
                        collection,
                        [Point(id=p.id, vector=p.vector, payload=p.payload) for p in points],
                    )
        assert all(row["stale"] == 1 for row in status().values())
        assert "wombat" in search_top("wombat", "posts")["text"]  # read from `text` meanwhile

        for data_type in data_types():
            embedded = harness.run(data_type)["embedded_chunks"]
            assert embedded["vectors_embedded"] == 0
            assert embedded["vectors_reused"] == embedded["chunks"] >= 1
        assert all(row["in_sync"] for row in status().values())
        with harness.feature_store() as store:
            (repository,) = store.points("vector_repositories")
            assert "wombat" in repository.payload["content"] and "text" not in repository.payload
            assert repository.payload["owner_id"] == "course-author"
