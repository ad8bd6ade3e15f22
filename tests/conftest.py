"""Shared fixtures: every test gets its own embedded stores under a temporary data dir."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import llm_twin_features.sample_data

SAMPLE_CORPUS = Path(llm_twin_features.sample_data.__file__).parent / "corpus.jsonl"
STORE_VARIABLES = ("MONGO_URI", "QDRANT_URL", "QDRANT_API_KEY", "DAGSTER_HOME")


@pytest.fixture(autouse=True, scope="session")
def no_run_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A backfill leaves no run server behind (cli/run_server.py): tests' commands run their
    runs themselves unless a test turns it on. Session-wide, so that module fixtures' commands
    see it too; a run server of this session still running at its end is an error."""
    import psutil

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RUN_SERVER_IDLE_SECONDS", "0")
        yield
    base = str(tmp_path_factory.getbasetemp())
    left = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "llm_twin_features.cli.run_server" in (
                process.info["cmdline"] or []
            ) and process.environ().get("LLM_TWIN_DATA_DIR", "").startswith(base):
                left.append(process)
                process.kill()
        except psutil.Error:
            continue
    assert not left, f"run servers outlived their tests: {[p.pid for p in left]}"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Embedded defaults under a fresh directory; server URLs from the caller's shell ignored."""
    for name in STORE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    directory = tmp_path / "data"
    monkeypatch.setenv("LLM_TWIN_DATA_DIR", str(directory))
    return directory


def sample_documents() -> list[dict]:
    return [json.loads(line) for line in SAMPLE_CORPUS.read_text().splitlines() if line.strip()]


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch):
    """A fresh queue topology on the real local RabbitMQ, removed afterwards."""
    import uuid

    import pika

    from llm_twin_features.stores.queue import BrokerConfig, close_kept_inboxes

    config = BrokerConfig(queue=f"test_events_{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv("RABBITMQ_QUEUE", config.queue)
    yield config
    close_kept_inboxes()  # the sensors' connections, evaluated in this process
    connection = pika.BlockingConnection(pika.ConnectionParameters(config.host, config.port))
    channel = connection.channel()
    channel.queue_delete(config.queue)
    channel.queue_delete(config.dead_letter_queue)
    channel.exchange_delete(config.dead_letter_exchange)
    connection.close()
