"""Fault injection with real components: the CLI and Dagster runs as real processes, the real
local RabbitMQ, montydb and qdrant local mode as the embedded stores, the bundled model.

Each test names the fault, how it is injected and what must hold afterwards. Figures they
measure (time to converge, peak memory) are printed as `FAULT-FIGURES {...}` lines (see them
with `pytest tests/e2e/test_faults.py -q -s`) and reported in RELIABILITY.md. Every wait is
bounded; every process a test starts is stopped by the test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import psutil
import pytest

from llm_twin_features import cli
from llm_twin_features.cli.common import REPO_DAGSTER_YAML, warehouse_of
from llm_twin_features.definitions import build_definitions
from llm_twin_features.defs.assets import (
    STORE_RETRY,
    SYNC_OP,
    scoped_run_config,
    sync_features,
)
from llm_twin_features.defs.jobs import (
    FEATURE_PIPELINE_JOB,
    WAREHOUSE_EVENTS_JOB,
    feature_pipeline_job,
)
from llm_twin_features.defs.resources import FeatureStoreResource, build_resources
from llm_twin_features.events.planning import SensorCursor
from llm_twin_features.events.schema import ChangeEvent
from llm_twin_features.settings import Settings
from llm_twin_features.stores.feature_store import (
    cleaned_collection,
    open_feature_store,
    vector_collection,
)
from llm_twin_features.stores.queue import (
    POISON_REASON_HEADER,
    BrokerUnavailable,
    EventInbox,
    EventPublisher,
    held_messages,
)
from llm_twin_features.stores.warehouse import open_warehouse

from ..conftest import SAMPLE_CORPUS, STORE_VARIABLES

from bench.generate_corpus import generate  # isort: skip  (the repo root, not a package)

CLI = str(Path(sys.executable).parent / "llm-twin-features")
IN_FLIGHT = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


# --- helpers -----------------------------------------------------------------------------------


def report(fault: str, **figures) -> None:
    """A line of measured figures for RELIABILITY.md (shown with -s)."""
    print(f"\nFAULT-FIGURES {json.dumps({'fault': fault, **figures})}", flush=True)


def cli_env(data_dir: Path, home: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: embedded stores under `data_dir` only."""
    env = {k: v for k, v in os.environ.items() if k not in STORE_VARIABLES}
    env.update(LLM_TWIN_DATA_DIR=str(data_dir), TOKENIZERS_PARALLELISM="false")
    if home is not None:
        env["DAGSTER_HOME"] = str(home)
    env.update(extra)
    return env


def run_cli(env: dict[str, str], *argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, *argv], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def write_jsonl(path: Path, documents: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents))
    return path


class LineReader:
    """Reads a child's merged output on a thread, so the test can wait on lines with a bound."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"process exited first; output:\n{self.text()[-3000:]}")
            if predicate(line):
                return line
        raise AssertionError(f"no such line within {timeout:.0f} s; output:\n{self.text()[-3000:]}")

    def text(self) -> str:
        return "".join(self.lines)


def start_cli(env: dict[str, str], *argv: str) -> tuple[subprocess.Popen, LineReader]:
    process = subprocess.Popen(
        [CLI, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return process, LineReader(process)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(30)


def status_rows(env: dict[str, str]) -> dict[str, dict]:
    result = run_cli(env, "status", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    return {row["type"]: row for row in map(json.loads, result.stdout.splitlines())}


def in_process(*argv: str) -> tuple[int, str, str]:
    """`llm-twin-features ARGV` in this process (env from the fixtures); exit code, out, err."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def census(data_dir: Path, data_type: str) -> dict:
    """Points as stored: counts, distinct keys, and the chunk state they must match."""
    store = open_feature_store(None, None, data_dir, lock_timeout=60)
    try:
        vectors = [p.payload or {} for p in store.points(vector_collection(data_type))]
        cleaned = [p.payload or {} for p in store.points(cleaned_collection(data_type))]
    finally:
        store.close()
    warehouse = open_warehouse(None, "twin", "twin_features", data_dir)
    try:
        chunks = {
            (d["_id"], c["chunk_index"])
            for d in warehouse.chunk_state(data_type).find(fields=["chunks"])
            for c in d.get("chunks", [])
        }
    finally:
        warehouse.close()
    keys = [(p.get("document_id"), p.get("chunk_index")) for p in vectors]
    return {
        "vector_points": len(vectors),
        "distinct_chunk_keys": len(set(keys)),
        "cleaned_points": len(cleaned),
        "distinct_cleaned": len({p.get("document_id") for p in cleaned}),
        "chunk_state": len(chunks),
        "points_match_chunk_state": set(keys) == chunks,
    }


def run_errors(result, event_type: dg.DagsterEventType, step: str) -> list[str]:
    """The error texts (with causes) of a run's events of one type for one step."""
    return [
        event.event_specific_data.error.to_string()
        for event in result.all_events
        if event.event_type == event_type and event.step_key == step
    ]


# --- 1. SIGKILL in the middle of a backfill ------------------------------------------------------


@dataclass
class KilledBackfill:
    env: dict[str, str]
    data_dir: Path
    home: Path
    documents: int
    kill_line: str
    returncode: int | None
    drift_after_kill: dict
    killed_runs: list[str]
    probe: dict = field(default_factory=dict)


BLOCKED_FOR = 8.0  # seconds a rerun may wait on a slot held by a dead run before we call it stuck


def probe_rerun(env: dict[str, str], home: Path, killed_runs: list[str]) -> dict:
    """Runs the next backfill, as an operator would after the crash; stops it (and says so)
    once it has waited BLOCKED_FOR seconds on a `feature_store` pool slot that only a dead run
    holds, instead of waiting for ever."""
    process, output = start_cli(env, "backfill", "--type", "articles")
    started = time.monotonic()
    blocked_since = None
    info = None
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            while process.poll() is None and time.monotonic() - started < 180:
                info = instance.event_log_storage.get_concurrency_info("feature_store")
                holders = {slot.run_id for slot in info.claimed_slots}
                waiting = {s.run_id for s in info.pending_steps if s.assigned_timestamp is None}
                if holders and holders <= set(killed_runs) and waiting - set(killed_runs):
                    blocked_since = blocked_since or time.monotonic()
                    if time.monotonic() - blocked_since >= BLOCKED_FOR:
                        break
                else:
                    blocked_since = None
                time.sleep(0.5)
    finally:
        stuck = process.poll() is None
        stop(process)
    return {
        "returncode": None if stuck else process.returncode,
        "stuck": stuck,
        "seconds": round(time.monotonic() - started, 1),
        "slot_holders": sorted({s.run_id for s in info.claimed_slots}) if info else [],
        "output": output.text(),
    }


@pytest.fixture(scope="module")
def killed_backfill(tmp_path_factory: pytest.TempPathFactory) -> KilledBackfill:
    """~40 generated articles ingested; `llm-twin-features backfill --type articles` started as
    a child process and SIGKILLed as soon as it reports its first embedded slice (512 of ~580
    chunks, the slice's upsert in flight); the audit is taken; then the next backfill runs
    (`probe_rerun`)."""
    root = tmp_path_factory.mktemp("sigkill")
    data_dir, home = root / "data", root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(REPO_DAGSTER_YAML.read_text())  # the laptop instance
    env = cli_env(data_dir, home)
    documents = generate(posts=0, articles=40, repositories=0, seed=11)
    ingested = run_cli(env, "ingest", "--no-publish", str(write_jsonl(root / "a.jsonl", documents)))
    assert ingested.returncode == 0, ingested.stderr

    process, output = start_cli(env, "backfill", "--type", "articles")
    try:
        kill_line = output.wait_for(lambda line: "embedded articles: 512/" in line, timeout=180)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    finally:
        stop(process)

    audit = run_cli(env, "audit", "--type", "articles", "--json", timeout=120)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        killed_runs = [r.run_id for r in instance.get_runs(dg.RunsFilter(statuses=IN_FLIGHT))]
    killed = KilledBackfill(
        env=env,
        data_dir=data_dir,
        home=home,
        documents=len(documents),
        kill_line=kill_line.strip()[-80:],
        returncode=process.returncode,
        drift_after_kill={"exit": audit.returncode, **json.loads(audit.stdout)},
        killed_runs=killed_runs,
    )
    killed.probe = probe_rerun(env, home, killed_runs)
    return killed


def test_sigkill_leaves_visible_drift_not_a_silent_half_state(killed_backfill: KilledBackfill):
    """What a run killed mid-embedding leaves is not "current": the audit reports it."""
    killed = killed_backfill
    assert killed.returncode == -signal.SIGKILL
    drift = killed.drift_after_kill
    assert drift["exit"] == 1 and drift["in_sync"] is False
    assert drift["without_vectors"] + drift["chunks_without_vectors"] >= 1, drift
    assert drift["orphans"] == 0 and drift["stale"] == 0
    assert len(killed.killed_runs) == 1  # the dead run is still STARTED in the instance


def test_sigkill_mid_backfill_next_run_converges(killed_backfill: KilledBackfill):
    """Fault: `backfill --type articles` SIGKILLed while its embed stage writes the first
    slice (the run holds the `feature_store` pool slot). The next backfill, with nothing else
    done, releases the dead run's slot and converges: audit clean, counts equal the
    warehouse, no duplicate or orphan point. Time to converge: that backfill's wall time."""
    killed = killed_backfill
    probe = killed.probe
    assert not probe["stuck"], (
        f"the next backfill waited {BLOCKED_FOR:.0f} s for the feature_store slot held by the "
        f"dead run(s) {probe['slot_holders']}; output: {probe['output'][-800:]}"
    )
    assert probe["returncode"] == 0, probe["output"][-3000:]
    assert f"released the pool slot of run {killed.killed_runs[0]}" in probe["output"]
    (summary,) = [line for line in probe["output"].splitlines() if "articles: done in" in line]
    with dg.DagsterInstance.from_config(str(killed.home)) as instance:
        assert instance.get_runs(dg.RunsFilter(statuses=IN_FLIGHT)) == []
        dead = instance.get_run_by_id(killed.killed_runs[0])
        assert dead is not None and dead.status == dg.DagsterRunStatus.FAILURE

    audit = run_cli(killed.env, "audit", "--type", "articles")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    row = status_rows(killed.env)["articles"]
    assert row["warehouse"] == row["cleaned"] == killed.documents
    assert row["vectors"] == row["chunks"] > killed.documents
    assert (row["missing"], row["stale"], row["orphans"], row["quarantined"]) == (0, 0, 0, 0)
    points = census(killed.data_dir, "articles")
    assert points["vector_points"] == points["distinct_chunk_keys"] == points["chunk_state"]
    assert points["cleaned_points"] == points["distinct_cleaned"] == killed.documents
    assert points["points_match_chunk_state"]
    report(
        "sigkill mid-backfill",
        documents=killed.documents,
        chunks=row["chunks"],
        killed_at=killed.kill_line,
        drift_after_kill={
            k: killed.drift_after_kill[k] for k in ("without_vectors", "chunks_without_vectors")
        },
        rerun_seconds=probe["seconds"],
        rerun_summary=summary.split(": ", 2)[-1],
        census=points,
    )


# --- 2. feature store or warehouse unavailable during a run ------------------------------------

HOLD_FEATURE_STORE = """
import sys, time
from pathlib import Path
from llm_twin_features.stores.feature_store import open_feature_store
store = open_feature_store(None, None, Path(sys.argv[1]))
print("held", flush=True)
time.sleep(float(sys.argv[2]))
store.close()
"""


def pipeline_job(feature_store: FeatureStoreResource | None = None) -> dg.JobDefinition:
    """`feature_pipeline_job` with the resources the environment gives, optionally another
    feature store resource (a short lock timeout)."""
    resources = build_resources()
    if feature_store is not None:
        resources["feature_store"] = feature_store
    defaults = build_definitions()
    defs = dg.Definitions(
        assets=defaults.assets,
        asset_checks=defaults.asset_checks,
        jobs=[feature_pipeline_job],
        resources=resources,
        executor=dg.in_process_executor,
    )
    return defs.resolve_job_def(FEATURE_PIPELINE_JOB)


def test_feature_store_held_by_another_process_fails_the_step_clearly_then_the_retry_succeeds(
    data_dir: Path,
):
    """Fault: the Qdrant local folder is held by another process (a child that opens the
    feature store and keeps it 4 s) when a run starts; the run's store resource waits 1 s
    for the lock. Must hold: the step fails with a clear "held by another process" message,
    STORE_RETRY retries it, the run succeeds, and the audit is clean afterwards."""
    assert in_process("ingest", "--no-publish", str(SAMPLE_CORPUS))[0] == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_FEATURE_STORE, str(data_dir), "4"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        job = pipeline_job(FeatureStoreResource(data_dir=str(data_dir), lock_timeout_seconds=1))
        started = time.monotonic()
        with dg.instance_for_test() as instance:
            result = job.execute_in_process(
                instance=instance, partition_key="posts", raise_on_error=False
            )
        seconds = time.monotonic() - started
        assert holder.wait(30) == 0
    finally:
        stop(holder)

    retried = run_errors(result, dg.DagsterEventType.STEP_UP_FOR_RETRY, SYNC_OP)
    assert retried, "the step was not retried"
    assert all("held by another process for more than 1 s" in error for error in retried)
    assert "FeatureStoreUnavailable" in retried[0]
    assert result.success
    assert not run_errors(result, dg.DagsterEventType.STEP_FAILURE, SYNC_OP)
    code, out, _ = in_process("audit", "--type", "posts", "--json")
    assert code == 0, out
    assert json.loads(out)["cleaned_points"] == 30
    report(
        "feature store held by another process",
        failed_attempts=len(retried),
        run_seconds=round(seconds, 1),
        message=next(line for line in retried[0].splitlines() if "held by" in line)[:200],
    )


def test_unreachable_warehouse_fails_the_run_with_a_clear_message_after_its_retries(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """Fault: MONGO_URI points at a port where nothing listens. Must hold: every asset carries
    STORE_RETRY; the stages' step fails with "warehouse unreachable", is retried, and the run
    fails (nothing downstream runs, nothing is written); the CLI says the same in one line.
    The retry delay is shortened for the test (pymongo waits 5 s per attempt)."""
    assert sync_features.op.retry_policy == STORE_RETRY
    assert (STORE_RETRY.max_retries, STORE_RETRY.delay) == (3, 2)
    assert STORE_RETRY.backoff == dg.Backoff.EXPONENTIAL
    monkeypatch.setenv("MONGO_URI", "mongodb://127.0.0.1:1/")
    monkeypatch.setattr(sync_features.op, "_retry_policy", dg.RetryPolicy(max_retries=1, delay=0))

    started = time.monotonic()
    with dg.instance_for_test() as instance:
        result = pipeline_job().execute_in_process(
            instance=instance, partition_key="posts", raise_on_error=False
        )
    seconds = time.monotonic() - started
    assert not result.success
    retried = run_errors(result, dg.DagsterEventType.STEP_UP_FOR_RETRY, SYNC_OP)
    failed = run_errors(result, dg.DagsterEventType.STEP_FAILURE, SYNC_OP)
    assert len(retried) == 1 and len(failed) == 1
    for error in retried + failed:
        assert "WarehouseUnavailable: warehouse unreachable: 127.0.0.1:1" in error
    assert result.get_asset_materialization_events() == []
    assert not (data_dir / "qdrant").exists()

    started_cli = time.monotonic()
    code, out, err = in_process("status")
    cli_seconds = time.monotonic() - started_cli
    assert code == 1 and out == ""
    assert err.startswith("error: warehouse unreachable: 127.0.0.1:1")
    report(
        "warehouse unreachable",
        attempts=len(retried) + len(failed),
        run_seconds=round(seconds, 1),
        cli_seconds=round(cli_seconds, 1),
        message=err.splitlines()[0][:120],
    )


# --- 3. RabbitMQ connections dropped while events flow ----------------------------------------


def drop_connections(pids: list[int], port: int) -> int:
    """Closes, on the broker side (`rabbitmqctl close_connection`), every AMQP connection that
    the given processes hold: the "connection dropped" fault, limited to this test's own
    connections (the broker stays up; other clients are untouched). Returns how many."""
    local_ports = {
        connection.laddr.port
        for pid in pids
        for connection in psutil.Process(pid).net_connections(kind="tcp")
        if connection.raddr and connection.raddr.port == port
    }
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "--no-table-headers", "pid", "peer_port"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    closed = 0
    for line in listed.stdout.splitlines():
        connection_pid, peer_port = line.split("\t")
        if int(peer_port) in local_ports:
            subprocess.run(
                ["rabbitmqctl", "-q", "close_connection", connection_pid, "fault test"],
                capture_output=True,
                timeout=30,
                check=False,
            )
            closed += 1
    return closed


class SensorLoop:
    """What the Dagster daemon does with `warehouse_events_sensor`, on a test instance: tick
    (a tick that raises is a failed tick: its cursor is not kept), launch the requested runs
    that do not exist yet under their run key, keep the cursor the tick returned."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self.instance = instance
        self.defs = build_definitions()
        self.sensor = self.defs.resolve_sensor_def("warehouse_events_sensor")
        self.job = self.defs.resolve_job_def(WAREHOUSE_EVENTS_JOB)
        self.cursor: str | None = None
        self.in_tick = threading.Event()
        self.failed_ticks: list[str] = []  # raised
        self.skipped_ticks: list[str] = []  # returned a skip reason naming RabbitMQ
        self.runs = 0

    def tick(self):
        context = dg.build_sensor_context(
            instance=self.instance,
            cursor=self.cursor,
            definitions=self.defs,
            resources=self.defs.get_repository_def().get_top_level_resources(),
        )
        self.in_tick.set()
        try:
            result = self.sensor.evaluate_tick(context)
        except Exception as error:  # the daemon records a failed tick and ticks again
            self.failed_ticks.append(f"{type(error).__name__}: {error}"[:300])
            return None
        finally:
            self.in_tick.clear()
        if "RabbitMQ" in (result.skip_message or ""):
            self.skipped_ticks.append(result.skip_message[:300])
        return result

    def interrupted_ticks(self) -> list[str]:
        return self.failed_ticks + self.skipped_ticks

    def step(self):
        result = self.tick()
        if result is None:
            return None
        for request in result.run_requests:
            if self.instance.get_runs(
                filters=dg.RunsFilter(tags={"dagster/run_key": request.run_key}), limit=1
            ):
                continue
            outcome = self.job.execute_in_process(
                instance=self.instance,
                partition_key=request.partition_key,
                run_config=request.run_config,
                tags={**request.tags, "dagster/run_key": request.run_key},
            )
            assert outcome.success
            self.runs += 1
        if result.cursor is not None:  # a tick without a cursor leaves it as it was
            self.cursor = result.cursor
        return result

    def covered(self) -> set[str]:
        return set(SensorCursor.loads(self.cursor).covered)


def queue_depths(broker) -> tuple[int, int]:
    """Messages not acked yet (in the queue or held by the sensors), and dead-lettered ones."""
    with EventInbox(broker) as inbox:
        dead = inbox.channel.queue_declare(broker.dead_letter_queue, passive=True)
        return inbox.depth() + held_messages(broker), dead.method.message_count


class RetryingPublisher:
    """A producer that is told a publish failed re-publishes the same event (same id) on a
    new connection: at-least-once, as the CLI tells its user to do."""

    def __init__(self, broker) -> None:
        self.broker = broker
        self.session: EventPublisher | None = None
        self.reconnects = 0

    def publish(self, event: ChangeEvent, attempts: int = 50) -> None:
        for _ in range(attempts):
            try:
                if self.session is None:
                    self.session = EventPublisher(self.broker).__enter__()
                self.session.publish([event])
                return
            except BrokerUnavailable:
                self.reconnects += 1
                if self.session is not None:
                    self.session.close()
                self.session = None
                time.sleep(0.1)
        raise AssertionError(f"could not publish {event.event_id}")

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


def test_connections_dropped_while_events_flow_lose_no_event(data_dir, broker, monkeypatch):
    """Fault: while 24 insert events are published (one every 0.3 s) and the sensor drains
    them, the broker closes this process's AMQP connections 3 times (the sensor's inbox, each
    time while a tick is in progress, and the publisher's). RabbitMQ itself is not restarted
    (it is shared): this is the "connection dropped" variant. Must hold: every event is
    covered by a run, every document reaches the feature store, nothing is left in the queue
    or dead-lettered."""
    monkeypatch.setenv("SENSOR_LONG_POLL_SECONDS", "1.0")
    # A tick reads on while events keep coming (settle), so drops land while it drains.
    monkeypatch.setenv("SENSOR_SETTLE_SECONDS", "1.5")
    documents = generate(posts=24, articles=0, repositories=0, seed=5)
    source = write_jsonl(data_dir.parent / "posts.jsonl", documents)
    assert in_process("ingest", "--no-publish", str(source))[0] == 0
    events = [ChangeEvent(type="posts", entry_id=d["_id"], op="insert") for d in documents]
    publisher = RetryingPublisher(broker)
    drops: list[tuple[float, int]] = []

    def publish_all() -> None:
        try:
            for event in events:
                publisher.publish(event)
                time.sleep(0.3)
        finally:
            publisher.close()

    with dg.instance_for_test() as instance:
        loop = SensorLoop(instance)

        def drop_during_ticks() -> None:
            for _ in range(3):
                if not loop.in_tick.wait(60):
                    return
                time.sleep(0.3)  # the tick is draining (or long-polling) by now
                for _ in range(10):  # a short tick may have closed its connection already
                    closed = drop_connections([os.getpid()], broker.port)
                    if closed:
                        break
                    time.sleep(0.2)
                drops.append((time.monotonic(), closed))
                time.sleep(1.0)

        threads = [
            threading.Thread(target=publish_all, daemon=True),
            threading.Thread(target=drop_during_ticks, daemon=True),
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 150
        wanted = {e.event_id for e in events}
        converged_at = None
        while time.monotonic() < deadline:
            loop.step()
            done = not any(t.is_alive() for t in threads) and wanted <= loop.covered()
            if done and queue_depths(broker) == (0, 0):
                converged_at = time.monotonic()
                break
        for thread in threads:
            thread.join(30)

    assert converged_at is not None, (
        f"not converged: {len(wanted - loop.covered())} events uncovered, "
        f"interrupted ticks {loop.interrupted_ticks()}"
    )
    assert len(drops) == 3 and all(closed >= 1 for _, closed in drops), drops
    assert loop.interrupted_ticks(), "no drop hit a tick: the fault was not injected mid-tick"
    assert publisher.reconnects >= 1, "no drop hit the publisher"
    code, out, _ = in_process("audit", "--type", "posts", "--json")
    row = json.loads(out)
    assert code == 0 and row["cleaned_points"] == 24 and row["vectors"] == row["chunks"]
    report(
        "rabbitmq connections dropped while events flow",
        events=len(events),
        drops=[closed for _, closed in drops],
        failed_ticks=len(loop.failed_ticks),
        skipped_ticks=len(loop.skipped_ticks),
        tick_error=loop.interrupted_ticks()[0][:160],
        publisher_reconnects=publisher.reconnects,
        runs=loop.runs,
        seconds_from_last_drop_to_converged=round(converged_at - drops[-1][0], 1),
    )


def test_a_connection_dropped_mid_tick_skips_the_tick_with_a_clear_message(
    data_dir, broker, monkeypatch
):
    """Fault: the broker closes the sensor's connection while the tick long-polls an empty
    queue. Must hold (README: "If RabbitMQ is down the tick is skipped with a clear message"):
    the tick returns a skip reason naming RabbitMQ rather than raising."""
    # A long poll well past the time the drop takes (rabbitmqctl needs ~1 s a call): the drop
    # must land while the tick waits, however slow the machine; it ends the poll early.
    monkeypatch.setenv("SENSOR_LONG_POLL_SECONDS", "8")
    closed: list[int] = []
    with dg.instance_for_test() as instance:
        loop = SensorLoop(instance)

        def drop() -> None:
            if not loop.in_tick.wait(30):
                return
            time.sleep(0.5)
            while loop.in_tick.is_set() and not closed:  # until the tick's connection is open
                if count := drop_connections([os.getpid()], broker.port):
                    closed.append(count)
                else:
                    time.sleep(0.2)

        dropper = threading.Thread(target=drop, daemon=True)
        dropper.start()
        result = loop.tick()
        dropper.join(30)
    assert closed, "the fault was not injected: no connection was open during the tick"
    assert not loop.failed_ticks, loop.failed_ticks
    assert result is not None and "RabbitMQ" in (result.skip_message or "")


# --- 4. poison messages and invalid documents in a stream of valid ones ---------------------------


def dead_letters(broker) -> list[tuple[bytes, str]]:
    with EventInbox(broker) as inbox:
        letters = []
        while True:
            method, properties, body = inbox.channel.basic_get(
                broker.dead_letter_queue, auto_ack=True
            )
            if method is None:
                return letters
            letters.append((body, (properties.headers or {}).get(POISON_REASON_HEADER, "")))


def test_poison_messages_and_invalid_documents_mixed_into_valid_events(
    data_dir, broker, monkeypatch
):
    """Fault: 12 valid post inserts, shuffled with 5 poison messages (broken JSON, bytes that
    are not UTF-8, an unknown type, no entry_id, an unknown op), 4 events for invalid
    documents (no platform, content null, no text, more text than MAX_DOCUMENT_CHARS=5000)
    and a delete event for a document that never existed. Must hold: the 12 valid documents
    reach the feature store, each poison message is dead-lettered with its reason, each
    invalid document is quarantined with its reason, the queue ends empty, audit clean."""
    monkeypatch.setenv("SENSOR_LONG_POLL_SECONDS", "0.3")
    monkeypatch.setenv("MAX_DOCUMENT_CHARS", "5000")
    valid = generate(posts=12, articles=0, repositories=0, seed=21)
    author = valid[0]["author_id"]
    invalid = [
        {"type": "posts", "_id": "bad-no-platform", "content": {"text": "x"}, "author_id": author},
        {"type": "posts", "_id": "bad-null", "platform": "x", "content": None, "author_id": author},
        {"type": "posts", "_id": "bad-no-text", "platform": "x", "content": {"image": None},
         "author_id": author},
        {"type": "posts", "_id": "bad-too-large", "platform": "x",
         "content": {"text": "word " * 1200}, "author_id": author},
    ]  # fmt: skip
    source = write_jsonl(data_dir.parent / "posts.jsonl", valid + invalid)
    assert in_process("ingest", "--no-publish", str(source))[0] == 0

    messages = [
        ChangeEvent(type="posts", entry_id=d["_id"], op="insert").to_json() for d in valid + invalid
    ]
    messages.append(ChangeEvent(type="posts", entry_id="never-existed", op="delete").to_json())
    poison = {
        b"{broken": "invalid JSON",
        b"\xff\xfe\x00": "invalid JSON",
        json.dumps({"type": "users", "entry_id": "u1", "op": "insert"}).encode(): "unknown type",
        json.dumps({"type": "posts", "op": "insert"}).encode(): "missing entry_id",
        json.dumps({"type": "posts", "entry_id": "p", "op": "upsert"}).encode(): "invalid event",
    }
    messages += list(poison)
    random.Random(3).shuffle(messages)
    with EventPublisher(broker) as publisher:
        for body in messages:
            publisher._publish("", broker.queue, body)

    started = time.monotonic()
    with dg.instance_for_test() as instance:
        loop = SensorLoop(instance)
        for _ in range(10):
            result = loop.step()
            if result is not None and not result.run_requests and queue_depths(broker)[0] == 0:
                break
    seconds = time.monotonic() - started
    assert not loop.failed_ticks
    assert queue_depths(broker)[0] == 0

    letters = dead_letters(broker)
    assert sorted(body for body, _ in letters) == sorted(poison)
    for body, reason in letters:
        assert reason.startswith(poison[body]), (body, reason)

    with warehouse_of(Settings()) as warehouse:
        reasons = {q["entry_id"]: q["reason"] for q in warehouse.quarantined("posts")}
    assert set(reasons) == {d["_id"] for d in invalid}
    assert "platform: Field required" in reasons["bad-no-platform"]
    assert "content: Input should be a valid dictionary" in reasons["bad-null"]
    assert "content has no text value" in reasons["bad-no-text"]
    assert reasons["bad-too-large"].startswith("document too large: 6,000 characters")

    code, out, _ = in_process("audit", "--type", "posts", "--json")
    row = json.loads(out)
    assert code == 0, out
    assert (row["warehouse_documents"], row["quarantined"], row["cleaned_points"]) == (16, 4, 12)
    report(
        "poison messages and invalid documents",
        messages=len(messages),
        valid_processed=row["cleaned_points"],
        dead_lettered=len(letters),
        quarantined=len(reasons),
        runs=loop.runs,
        seconds=round(seconds, 1),
    )


# --- 5. oversized input ----------------------------------------------------------------------

PEAK_RSS = """
import resource, sys
from llm_twin_features.cli import main
code = main(sys.argv[1:])
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
helpers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(f"PEAK_RSS_KB {own} {helpers}")
sys.exit(code)
"""


@dataclass
class MeasuredBackfill:
    own_mb: int  # the backfill's process: documents, chunks, the Dagster run
    helper_mb: int  # its largest helper process: the model server that embeds
    seconds: float
    output: str


def measured_backfill(env: dict[str, str], data_type: str) -> MeasuredBackfill:
    """`backfill --type T` in a child process; the peak RSS of that process and of its
    helper (the model server), apart: the model dominates the sum, and its peak varies by
    about 10 MB from one run to the next."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, "backfill", "--type", data_type],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    own_kb, helper_kb = map(int, result.stdout.rsplit("PEAK_RSS_KB ", 1)[1].split())
    return MeasuredBackfill(own_kb // 1024, helper_kb // 1024, seconds, result.stdout)


def big_repository(files: int, author: str) -> dict:
    """A repository of `files` small Python files (~150 characters each)."""
    content = {
        f"pkg_{i // 100:02d}/module_{i:04d}.py": (
            f"def handler_{i}(records: list) -> list:\n"
            f'    """Validates batch {i} of the feature pipeline before it is chunked."""\n'
            f"    return [r for r in records if r][: {i % 97 + 3}]\n"
        )
        for i in range(files)
    }
    return {
        "type": "repositories",
        "_id": f"monorepo-{files}-files",
        "name": f"monorepo-{files}",
        "link": f"https://github.com/decodingml/monorepo-{files}",
        "content": content,
        "owner_id": author,
    }


def test_oversized_inputs_are_quarantined_or_processed_in_bounded_memory(data_dir: Path):
    """Fault: a 10 MB article (10,000,004 characters, ten times MAX_DOCUMENT_CHARS) among 3
    normal ones, and a repository of 2,000 files (~150 characters each, ~300,000 in all).
    Must hold: the article is quarantined at the raw stage with a "document too large"
    reason and its run succeeds with the 3 others processed; the repository is processed
    (it is within the limit). Each backfill runs in a child process whose peak RSS is
    measured. Baseline: the backfill of a 200-file repository (the same chunk shape, 1/10 of
    the chunks), whose embedding batches are as large. Bounded: with 10 times the chunks, the
    2,000-file repository peaks below 1.5 times the baseline, and the run with the 10 MB
    article does not exceed the baseline."""
    author = generate(posts=1, articles=0, repositories=0, seed=8)[0]["author_id"]
    normal = generate(posts=0, articles=3, repositories=0, seed=8)
    huge = {
        "type": "articles",
        "_id": "huge-article-10mb",
        "platform": "medium",
        "link": "https://medium.com/decodingml/huge",
        "content": {"Title": "Huge", "Content": ("An enormous article. " * 476_191)[:10_000_000]},
        "author_id": author,
    }
    env = cli_env(data_dir)
    baseline_source = write_jsonl(data_dir.parent / "small.jsonl", [big_repository(200, author)])
    assert in_process("ingest", "--no-publish", str(baseline_source))[0] == 0
    baseline = measured_backfill(env, "repositories")

    source = write_jsonl(
        data_dir.parent / "big.jsonl", [*normal, huge, big_repository(2000, author)]
    )
    assert source.stat().st_size > 10_000_000
    assert in_process("ingest", "--no-publish", str(source))[0] == 0
    articles = measured_backfill(env, "articles")
    repos = measured_backfill(env, "repositories")

    with warehouse_of(Settings()) as warehouse:
        reasons = {q["entry_id"]: q for q in warehouse.quarantine().find()}
    assert set(reasons) == {"huge-article-10mb"}
    assert reasons["huge-article-10mb"]["stage"] == "raw"
    assert reasons["huge-article-10mb"]["reason"].startswith(
        "document too large: 10,000,004 characters of text, the limit is 1,000,000"
    )
    rows = status_rows(env)
    assert (rows["articles"]["warehouse"], rows["articles"]["quarantined"]) == (4, 1)
    assert rows["articles"]["cleaned"] == 3 and rows["articles"]["in_sync"]
    repo = rows["repositories"]
    assert repo["cleaned"] == 2 and repo["in_sync"]
    assert repo["vectors"] == repo["chunks"] > 0
    # The 10 MB article is read, found too large and set aside: a few copies of its text at
    # most, never its chunks or their vectors (about 2,500 chunks of 384 floats and text).
    assert articles.own_mb <= baseline.own_mb + 60
    assert articles.helper_mb <= baseline.helper_mb + 30  # embeds 3 articles, as the baseline
    # Ten times the chunks, in batches of the same size: far less than ten times the memory.
    assert repos.own_mb < 1.5 * baseline.own_mb and repos.helper_mb < 1.5 * baseline.helper_mb
    report(
        "oversized input",
        **{
            name: {
                "peak_rss_mb": {"backfill": run.own_mb, "model_server": run.helper_mb},
                "seconds": round(run.seconds, 1),
            }
            for name, run in [
                ("baseline_repository_200_files", baseline),
                ("article_10mb_run", articles),
                ("repository_2000_files_run", repos),
            ]
        },
        repository_2000_files_chunks=repo["chunks"],
        articles_summary=articles.output.strip().splitlines()[-2][-110:],
        repositories_summary=repos.output.strip().splitlines()[-2][-110:],
    )


# --- 6. concurrent backfill and event runs on one partition ------------------------------------


MARKERS = {  # search query -> the sentence appended to an edited post
    "axolotl aquarium in the data center lobby": "Concurrency marker: an axolotl aquarium now "
    "sits in the data center lobby.",
    "glacier telescope calibration": "Concurrency marker: a glacier telescope calibrates "
    "itself every night.",
}


def test_concurrent_backfill_and_event_run_on_the_same_partition(data_dir, tmp_path, monkeypatch):
    """Fault: two runs at once on the posts partition of one Dagster instance (the laptop
    dagster.yaml: `feature_store` pool of 1): a whole-partition `llm-twin-features backfill
    --type posts` child process, and, started once that backfill's run has begun, the event
    run for 2 posts edited in the warehouse (`warehouse_events_job` scoped to them, as the
    sensor requests it) in this process. Must hold: both succeed (they queue for the pool
    slot / Qdrant lock, neither fails), the audit is clean, the edits are searchable."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(REPO_DAGSTER_YAML.read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert in_process("ingest", "--no-publish", str(SAMPLE_CORPUS))[0] == 0
    defs = build_definitions()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        first = defs.resolve_job_def(FEATURE_PIPELINE_JOB).execute_in_process(
            instance=instance, partition_key="posts"
        )
        assert first.success

    with warehouse_of(Settings()) as warehouse:
        posts = warehouse.documents("posts")
        edited = sorted(i for i in posts.ids() if not i.startswith("invalid-"))[:2]
        changed = []
        for entry_id, marker in zip(edited, MARKERS.values(), strict=True):
            post = posts.get(entry_id)
            post["content"]["text"] += f"\n\n{marker}"
            changed.append(post)
        posts.replace_many(changed)

    started = time.monotonic()
    backfill, output = start_cli(cli_env(data_dir, home), "backfill", "--type", "posts")
    try:
        output.wait_for(lambda line: "raw posts:" in line, timeout=120)  # its run has begun
        with dg.DagsterInstance.from_config(str(home)) as instance:
            event_run = defs.resolve_job_def(WAREHOUSE_EVENTS_JOB).execute_in_process(
                instance=instance,
                partition_key="posts",
                run_config=scoped_run_config(edited),
                tags={"llm_twin/trigger": "events"},
            )
        event_seconds = time.monotonic() - started
        assert backfill.wait(240) == 0, output.text()[-3000:]
    finally:
        stop(backfill)
    both_seconds = time.monotonic() - started
    assert event_run.success

    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": "posts"}))
        assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS] * 3
        windows = {}
        for run in runs[:2]:
            steps = [
                (e.timestamp, e.dagster_event.step_key)
                for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
            ]
            windows[run.job_name] = (min(t for t, _ in steps), max(t for t, _ in steps))
    (backfill_start, backfill_last), (event_start, event_last) = (
        windows[FEATURE_PIPELINE_JOB],
        windows[WAREHOUSE_EVENTS_JOB],
    )
    overlapped = event_start < backfill_last and backfill_start < event_last

    code, out, _ = in_process("audit", "--type", "posts", "--json")
    row = json.loads(out)
    assert code == 0, out
    assert row["cleaned_points"] == 30 and row["vectors"] == row["chunks"]
    points = census(data_dir, "posts")
    assert points["vector_points"] == points["distinct_chunk_keys"] == points["chunk_state"]
    for entry_id, (query, marker) in zip(edited, MARKERS.items(), strict=True):
        code, out, _ = in_process("search", query, "--type", "posts", "--json", "--limit", "1")
        hit = json.loads(out)
        assert code == 0 and hit["document_id"] == entry_id
        assert marker in hit["text"]
    report(
        "concurrent backfill and event run",
        steps_overlapped=overlapped,
        event_run_seconds=round(event_seconds, 1),
        both_done_seconds=round(both_seconds, 1),
    )
