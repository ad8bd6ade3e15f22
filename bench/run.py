"""`make bench`: the figures of BENCHMARKS.md, on embedded defaults, in one run.

1. Backfill: a generated corpus (>= 2,000 chunks) through `llm-twin-features backfill` (a
   Dagster run per data type, in a child process so its peak memory can be read), against
   bare `model.encode` of the very same chunk texts.
2. Small changes, as a user makes them from the command line: a backfill where nothing
   changed (and the same forced through Dagster), one paragraph of one article edited, one
   post deleted, each synced with `backfill --type T --ids ID`; at the end again on the
   corpus grown to 4x, to show that their cost follows the change, not the corpus.
3. Freshness: the laptop stack (`dagster dev` + model server, as `make run` starts it);
   single events, publish -> the run covering it has finished (its vectors are in Qdrant);
   the same edit and delete synced by `backfill --ids` while the stack runs (it launches
   through the stack's Dagster); then a burst of 500 insert events, publish -> every
   document embedded.

Results go to bench/.work/results.json and are printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work"
sys.path.insert(0, str(ROOT))

from bench.generate_corpus import generate  # noqa: E402
from llm_twin_features.cli.run_server import stop_run_server  # noqa: E402
from llm_twin_features.settings import Settings  # noqa: E402

BIN = Path(sys.executable).parent
MODEL_LOAD_PROBE = """
import time
started = time.perf_counter()
from llm_twin_features.domain.embedding import load_local_model
from llm_twin_features.domain.embedding import BUNDLED_MODEL
load_local_model(BUNDLED_MODEL)
print(time.perf_counter() - started)
"""
CLI = str(BIN / "llm-twin-features")
BENCH_DOCUMENTS = 300  # the generated corpus: 150 posts, 120 articles, 30 repositories


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_jsonl(path: Path, documents: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents))
    return path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_durations(home: Path, trigger: str) -> list[tuple[float, float, dict]]:
    """(start, end, tags) of successful runs with the given trigger tag."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.get_run_records(
            filters=dg.RunsFilter(
                statuses=[dg.DagsterRunStatus.SUCCESS], tags={"llm_twin/trigger": trigger}
            )
        )
        return [(r.start_time, r.end_time, dict(r.dagster_run.tags)) for r in records]


# --- backfill --------------------------------------------------------------------------------


def bench_backfill(env: dict, home: Path, corpus: Path) -> dict:
    subprocess.run([CLI, "ingest", "--no-publish", str(corpus)], env=env, check=True)
    log("cold backfill (all partitions)")
    started = time.perf_counter()
    # No run server left behind here: it would load its model beside the bare encode below.
    cold_env = {**env, "RUN_SERVER_IDLE_SECONDS": "0"}
    subprocess.run([CLI, "backfill"], env=cold_env, check=True, stdout=subprocess.DEVNULL)
    cold_wall = time.perf_counter() - started
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    cold_runs = run_durations(home, "cli-backfill")
    cold_run_seconds = sum(end - start for start, end, _ in cold_runs)

    from llm_twin_features.domain.embedding import encode_workers
    from llm_twin_features.stores.warehouse import open_warehouse

    settings = Settings(data_dir=Path(env["LLM_TWIN_DATA_DIR"]))
    warehouse = open_warehouse(None, "twin", "twin_features", settings.resolved_data_dir)
    texts = {
        t: [c["chunk_content"] for d in warehouse.chunk_state(t).find() for c in d["chunks"]]
        for t in ("posts", "articles", "repositories")
    }
    warehouse.close()
    chunks = sum(len(v) for v in texts.values())

    # The baseline is the fastest single `model.encode` call over a few batch sizes (the
    # pipeline's own among them): the model's speed on this machine, not a straw man.
    from llm_twin_features.pipeline.embedders import EmbeddingDispatcher

    bare_by_batch_size: dict[int, float] = {}
    for batch_size in sorted({16, 32, 64, settings.embedding_batch_size}):
        log(f"bare model.encode of the same {chunks} chunks, batch size {batch_size}")
        seconds = 0.0
        for data_type, chunk_texts in texts.items():
            embedder = EmbeddingDispatcher.embedder(data_type, settings)
            model = embedder.model
            model.encode(["warm-up"], show_progress_bar=False)
            started = time.perf_counter()
            model.encode(
                chunk_texts,
                prompt=embedder.instruction,
                batch_size=batch_size,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
            seconds += time.perf_counter() - started
        bare_by_batch_size[batch_size] = seconds
    bare_batch_size = min(bare_by_batch_size, key=bare_by_batch_size.__getitem__)
    bare_seconds = bare_by_batch_size[bare_batch_size]

    log("one-time model load of a fresh process (part of the cold backfill)")
    load = subprocess.run(
        [sys.executable, "-c", MODEL_LOAD_PROBE],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    model_load_seconds = float(load.stdout.strip().splitlines()[-1])

    return {
        "chunks": chunks,
        "cold_run_seconds": cold_run_seconds,
        "cold_wall_seconds": cold_wall,
        "cold_chunks_per_second": chunks / cold_run_seconds,
        "bare_encode_seconds": bare_seconds,
        "bare_batch_size": bare_batch_size,
        "bare_seconds_by_batch_size": bare_by_batch_size,
        "pipeline_batch_size": settings.embedding_batch_size,
        "pipeline_encode_workers": encode_workers(settings.embedding_workers),
        "bare_chunks_per_second": chunks / bare_seconds,
        "ratio": bare_seconds / cold_run_seconds,
        "model_load_seconds": model_load_seconds,
        "ratio_without_model_load": bare_seconds / (cold_run_seconds - model_load_seconds),
        "backfill_peak_rss_mb": peak_rss_mb,
    }


# --- small changes ---------------------------------------------------------------------------


def timed(env: dict, *argv: str) -> tuple[float, str]:
    """Wall seconds and output of one CLI command (a fresh process, as a user runs it)."""
    started = time.perf_counter()
    result = subprocess.run([CLI, *argv], env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - started, result.stdout + result.stderr


def edit_one_article(env: dict, number: int) -> tuple[str, int]:
    """Rewrites one paragraph of one article in the warehouse (as a crawler would)."""
    from llm_twin_features.stores.warehouse import open_warehouse

    warehouse = open_warehouse(None, "twin", "twin_features", Path(env["LLM_TWIN_DATA_DIR"]))
    articles = warehouse.documents("articles")
    entry_id = sorted(articles.ids())[number]
    document = articles.get(entry_id)
    paragraphs = document["content"]["Content"].split("\n\n")
    paragraphs[len(paragraphs) // 2] = f"An edited paragraph, revision {uuid.uuid4().hex}."
    document["content"]["Content"] = "\n\n".join(paragraphs)
    articles.replace_many([document])
    warehouse.close()
    return entry_id, len(paragraphs)


def delete_one_post(env: dict, number: int) -> str:
    """Deletes the `number`-th post (by id) from the warehouse with the CLI, not synced yet."""
    from llm_twin_features.stores.warehouse import open_warehouse

    warehouse = open_warehouse(None, "twin", "twin_features", Path(env["LLM_TWIN_DATA_DIR"]))
    post_id = sorted(warehouse.documents("posts").ids())[number]
    warehouse.close()
    subprocess.run(
        [CLI, "delete", "--no-publish", "--type", "posts", post_id],
        env=env,
        check=True,
        capture_output=True,
    )
    return post_id


def bench_small_changes(env: dict, rounds: int = 3) -> dict:
    """Medians over `rounds` of each small change, synced from the command line. The first
    command that runs a pipeline run leaves a run server behind (cli/run_server.py), which
    the next ones go through, as a user's commands do; then the same edit and delete once
    more with it turned off (each command imports Dagster and opens the store itself)."""
    no_change, forced, edits, edit_runs, deletes = [], [], [], [], []
    for number in range(rounds):
        seconds, output = timed(env, "backfill")
        assert "unchanged since run" in output and "done in" not in output, output[-2000:]
        no_change.append(seconds)
        forced.append(timed(env, "backfill", "--force")[0])

        entry_id, _ = edit_one_article(env, number)
        seconds, output = timed(env, "backfill", "--type", "articles", "--ids", entry_id)
        assert re.search(r"\b[12] embedded", output), output[-2000:]
        edits.append(seconds)
        edit_runs.append(float(re.findall(r"done in ([\d.]+) s", output)[-1]))

        post_id = delete_one_post(env, number)
        deletes.append(timed(env, "backfill", "--type", "posts", "--ids", post_id)[0])
        timed(env, "backfill")  # the next round starts from a recorded complete sync
    off = {**env, "RUN_SERVER_IDLE_SECONDS": "0"}
    entry_id, _ = edit_one_article(env, rounds)
    edit_alone, output = timed(off, "backfill", "--type", "articles", "--ids", entry_id)
    assert "through the run server" not in output, output[-2000:]
    post_id = delete_one_post(env, rounds)
    delete_alone = timed(off, "backfill", "--type", "posts", "--ids", post_id)[0]
    timed(env, "backfill")
    median = lambda values: percentile(values, 0.5)  # noqa: E731
    return {
        "no_change_backfill_seconds": median(no_change),
        "forced_no_change_backfill_seconds": median(forced),
        "edit_one_article_seconds": median(edits),
        "edit_one_article_run_seconds": median(edit_runs),
        "delete_one_post_seconds": median(deletes),
        "edit_one_article_without_run_server_seconds": edit_alone,
        "delete_one_post_without_run_server_seconds": delete_alone,
    }


def grow_corpus(env: dict, documents: int) -> int:
    """Adds new documents of the bench's mix until the warehouse holds `documents`, and
    backfills them; returns how many documents it holds then."""
    from llm_twin_features.stores.warehouse import open_warehouse

    warehouse = open_warehouse(None, "twin", "twin_features", Path(env["LLM_TWIN_DATA_DIR"]))
    present = sum(warehouse.documents(t).count() for t in ("posts", "articles", "repositories"))
    warehouse.close()
    missing = max(documents - present, 0)
    posts, articles = missing // 2, missing * 2 // 5  # the bench corpus' mix
    extra = generate(posts, articles, missing - posts - articles, seed=8)
    path = write_jsonl(WORK / "corpus_grown.jsonl", extra)
    subprocess.run(
        [CLI, "ingest", "--no-publish", str(path)], env=env, check=True, capture_output=True
    )
    log(f"backfill of the corpus grown to {present + len(extra)} documents")
    subprocess.run([CLI, "backfill"], env=env, check=True, capture_output=True)
    return present + len(extra)


# --- freshness -------------------------------------------------------------------------------


def covered_by(instance, entry_ids: set[str], after: float, timeout: float) -> dict[str, object]:
    """The first successful event run created after `after` that covers each id (its record)."""
    import dagster as dg

    from llm_twin_features.defs.assets import run_scope

    found: dict[str, object] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = instance.get_run_records(
            filters=dg.RunsFilter(
                statuses=[dg.DagsterRunStatus.SUCCESS],
                tags={"llm_twin/trigger": "events"},
                created_after=datetime.fromtimestamp(after - 1, tz=UTC),
            )
        )
        for record in records:
            for entry_id in run_scope(record.dagster_run.run_config) or []:
                if entry_id in entry_ids and (
                    entry_id not in found or record.end_time < found[entry_id].end_time
                ):
                    found[entry_id] = record
        if len(found) == len(entry_ids):
            return found
        time.sleep(0.1)
    raise TimeoutError(f"{len(entry_ids) - len(found)} documents not covered within {timeout} s")


PHASES = ("sensor", "launch", "process_start", "stages")


def phases(instance, record, published: float) -> dict[str, float]:
    """Where a single event's time went: publish -> run created (sensor), -> launched,
    -> run process ready (RUN_START), -> run finished (the four stages)."""
    import dagster as dg

    def first(event_type) -> float:
        return instance.all_logs(record.dagster_run.run_id, of_type=event_type)[0].timestamp

    created = record.create_timestamp.timestamp()
    launched = first(dg.DagsterEventType.RUN_STARTING)
    started = first(dg.DagsterEventType.RUN_START)
    return {
        "sensor": created - published,
        "launch": launched - created,
        "process_start": started - launched,
        "stages": record.end_time - started,
    }


def single_event_figures(latencies: list[float], breakdown: list[dict]) -> dict:
    return {
        "single_events": len(latencies),
        "freshness_p50_seconds": percentile(latencies, 0.5),
        "freshness_p95_seconds": percentile(latencies, 0.95),
        "freshness_max_seconds": max(latencies),
        "freshness_first_event_seconds": latencies[0],
        "phase_medians_seconds": {k: percentile([b[k] for b in breakdown], 0.5) for k in PHASES},
        "phase_max_seconds": {k: max(b[k] for b in breakdown) for k in PHASES},
    }


def bench_cli_through_stack(env: dict, singles: int) -> dict:
    """One article edited and one post deleted, each synced by `backfill --type T --ids ID`
    while the laptop stack runs: the command launches through the stack's Dagster. A few
    seconds apart, as a user types them (back to back, a run may wait for the stack's next
    run process to finish importing)."""
    edits, deletes = [], []
    for number in range(singles):
        entry_id, _ = edit_one_article(env, 20 + number)
        seconds, output = timed(env, "backfill", "--type", "articles", "--ids", entry_id)
        assert "through the running stack" in output and re.search(r"\b[12] embedded", output)
        edits.append(seconds)
        time.sleep(3)
        post_id = delete_one_post(env, -1 - number)
        seconds, output = timed(env, "backfill", "--type", "posts", "--ids", post_id)
        assert "through the running stack" in output, output[-2000:]
        deletes.append(seconds)
        log(f"through the stack: edit {edits[-1]:.2f} s, delete {deletes[-1]:.2f} s")
        time.sleep(3)
    return {
        "stack_cli_edit_one_article_seconds": percentile(edits, 0.5),
        "stack_cli_delete_one_post_seconds": percentile(deletes, 0.5),
    }


def bench_freshness(env: dict, home: Path, singles: int, burst: int) -> dict:
    import dagster as dg

    from llm_twin_features.events.schema import ChangeEvent
    from llm_twin_features.runtime.local_stack import LocalStack, free_port
    from llm_twin_features.stores.queue import EventPublisher
    from llm_twin_features.stores.warehouse import open_warehouse

    os.environ.update(env)
    settings = Settings()
    stop_run_server(settings)  # as `llm-twin-features dev` does before starting the stack
    broker = settings.broker_config()
    warehouse = open_warehouse(None, "twin", "twin_features", settings.resolved_data_dir)
    posts = warehouse.documents("posts")
    ids = sorted(posts.ids())
    with (
        open(WORK / "stack.log", "w") as stack_log,
        LocalStack(settings, home, ui_port=free_port(), model_port=free_port(), log=stack_log),
        dg.DagsterInstance.from_config(str(home)) as instance,
    ):
        time.sleep(15)  # let dagster dev load the code location and start the sensor
        log(f"{singles} single events")
        latencies, breakdown = [], []
        for number in range(singles):
            entry_id = ids[number % len(ids)]
            document = posts.get(entry_id)
            document["content"]["text"] += f"\n\nEdit {uuid.uuid4().hex}."
            posts.replace_many([document])
            published = time.time()
            with EventPublisher(broker) as publisher:
                publisher.publish([ChangeEvent(type="posts", entry_id=entry_id, op="update")])
            record = covered_by(instance, {entry_id}, published, 120)[entry_id]
            latencies.append(record.end_time - published)
            breakdown.append(phases(instance, record, published))
            log(
                f"event {number + 1}: searchable after {latencies[-1]:.2f} s ("
                + ", ".join(f"{k} {v:.2f}" for k, v in breakdown[-1].items())
                + ")"
            )
            time.sleep(1 + number % 4)  # events land at every phase of the sensor loop

        stack_cli = bench_cli_through_stack(env, singles=5)
        log(json.dumps(stack_cli))
        if not burst:
            warehouse.close()
            return {**single_event_figures(latencies, breakdown), **stack_cli}
        # The burst has the backfill corpus' mix of types (half posts, 40% articles, 10% code).
        documents = generate(burst // 2, burst * 2 // 5, burst // 10, seed=99)
        log(f"burst of {len(documents)} insert events")
        for data_type in ("posts", "articles", "repositories"):
            batch = [
                {k: v for k, v in d.items() if k != "type"}
                for d in documents
                if d["type"] == data_type
            ]
            warehouse.documents(data_type).replace_many(batch)
        published = time.time()
        with EventPublisher(broker) as publisher:
            publisher.publish(
                ChangeEvent(type=d["type"], entry_id=d["_id"], op="insert") for d in documents
            )
        runs = covered_by(instance, {d["_id"] for d in documents}, published, timeout=900)
        burst_seconds = max(record.end_time for record in runs.values()) - published
    burst_chunks = sum(
        len(warehouse.chunk_state(d["type"]).get(d["_id"])["chunks"]) for d in documents
    )
    warehouse.close()
    return {
        **single_event_figures(latencies, breakdown),
        **stack_cli,
        "burst_events": len(documents),
        "burst_chunks": burst_chunks,
        "burst_seconds": burst_seconds,
        "burst_chunks_per_second": burst_chunks / burst_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--singles", type=int, default=20)
    parser.add_argument("--burst", type=int, default=500, help="0: no burst")
    parser.add_argument("--skip-freshness", action="store_true")
    parser.add_argument(
        "--no-scale", dest="scale", action="store_false", help="skip the 4x-corpus small changes"
    )
    args = parser.parse_args()

    import shutil

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    home = WORK / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    env = {
        **os.environ,
        "LLM_TWIN_DATA_DIR": str(WORK / "data"),
        "DAGSTER_HOME": str(home),
        "RABBITMQ_QUEUE": f"bench_{uuid.uuid4().hex[:8]}",
        "HF_HUB_OFFLINE": "1",
        # No scheduled audit during the measurement: it would compete with the measured runs.
        "AUDIT_CRON": "0 0 1 1 *",
    }
    env.pop("EMBEDDING_SERVICE_URL", None)
    corpus = write_jsonl(WORK / "corpus.jsonl", generate(150, 120, 30, seed=7))
    assert BENCH_DOCUMENTS == 150 + 120 + 30

    results = {"backfill": bench_backfill(env, home, corpus)}
    log(json.dumps(results["backfill"], indent=1))
    log("small changes on the bench corpus")
    small = bench_small_changes(env)
    cold = results["backfill"]["cold_wall_seconds"]
    small["documents"] = BENCH_DOCUMENTS
    small["no_change_share_of_cold"] = small["no_change_backfill_seconds"] / cold
    results["small_changes"] = small
    log(json.dumps(small, indent=1))
    if not args.skip_freshness:
        results["events"] = bench_freshness(env, home, args.singles, args.burst)
        if args.burst:
            results["events"]["burst_share_of_backfill"] = (
                results["events"]["burst_chunks_per_second"]
                / results["backfill"]["cold_chunks_per_second"]
            )
        log(json.dumps(results["events"], indent=1))
    if args.scale:
        # The same small changes on a corpus 4x the bench corpus: their cost should follow
        # the change, not the corpus.
        grown = {"documents": grow_corpus(env, 4 * BENCH_DOCUMENTS)}
        log(f"small changes on the corpus of {grown['documents']} documents")
        grown.update(bench_small_changes(env))
        small["x4"] = grown
        small["x4_ratios"] = {k: grown[k] / small[k] for k in grown if k in small}
        log(json.dumps(small["x4_ratios"], indent=1))
    stop_run_server(Settings(data_dir=WORK / "data"))
    (WORK / "results.json").write_text(json.dumps(results, indent=2))
    _cleanup_queue(env["RABBITMQ_QUEUE"])
    print(json.dumps(results, indent=2))


def _cleanup_queue(queue: str) -> None:
    import pika

    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    channel = connection.channel()
    for name in (queue, f"{queue}.dead-letter"):
        channel.queue_delete(name)
    channel.exchange_delete(f"{queue}.dlx")
    connection.close()


if __name__ == "__main__":
    main()
