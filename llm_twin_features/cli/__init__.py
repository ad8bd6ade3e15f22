"""`llm-twin-features`: ingest, backfill, search and status on the configured stores."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llm_twin_features.settings import DATA_TYPES, Settings

REPO_DAGSTER_YAML = Path(__file__).resolve().parents[2] / "dagster.yaml"


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- stores ------------------------------------------------------------------------------------


@contextmanager
def _warehouse(settings: Settings):
    from llm_twin_features.stores.warehouse import open_warehouse

    warehouse = open_warehouse(
        settings.mongo_uri,
        settings.mongo_database,
        settings.features_database,
        settings.resolved_data_dir,
    )
    try:
        warehouse.ping()
        yield warehouse
    finally:
        warehouse.close()


@contextmanager
def _feature_store(settings: Settings):
    from llm_twin_features.stores.feature_store import open_feature_store

    api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
    store = open_feature_store(
        settings.qdrant_url, api_key, settings.resolved_data_dir, on_wait=_err
    )
    try:
        yield store
    finally:
        store.close()


# --- ingest ------------------------------------------------------------------------------------


MAX_NESTING = 100  # levels of objects/arrays in one document; deeper lines are rejected
_BOM = b"\xef\xbb\xbf"
_ID_NAMESPACE = uuid.UUID("5b0c6bd4-6a43-4a8e-9f3e-0f6d1c2b7a10")  # ids of documents without one


def read_documents(paths: Iterable[str]) -> Iterator[tuple[str, dict | None, str | None]]:
    """(file:line, document, error) per non-blank line of JSONL files.

    Each line stands alone: a line that is not UTF-8, not JSON, nested too deeply or not a
    warehouse document gets its own error, and the lines around it are still read. A UTF-8
    byte-order mark at the start of a file is ignored.
    """
    for path in paths:
        try:
            with open(path, "rb") as lines:
                for number, raw in enumerate(lines, start=1):
                    if number == 1 and raw.startswith(_BOM):
                        raw = raw[len(_BOM) :]
                    if not raw.strip():
                        continue
                    document, error = parse_document_line(raw)
                    yield f"{path}:{number}", document, error
        except OSError as error:
            yield path, None, f"cannot read the file: {error.strerror or error}"


def parse_document_line(raw: bytes) -> tuple[dict | None, str | None]:
    """One JSONL line as a warehouse document with `type` and a string `_id`, or the reason
    it cannot be one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, f"not UTF-8: {error}"
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"invalid JSON: {error.msg} (column {error.colno})"
    except RecursionError:
        return None, f"nested deeper than {MAX_NESTING} levels"
    if not isinstance(document, dict):
        return None, "a line must be a JSON object"
    if _nesting(document) > MAX_NESTING:
        return None, f"nested deeper than {MAX_NESTING} levels"
    data_type = document.pop("type", None)
    if data_type not in DATA_TYPES:
        return None, f"unknown type {data_type!r}; expected one of {', '.join(DATA_TYPES)}"
    operators = sorted(k for k in document if k.startswith("$"))
    if operators:
        return None, f"field names may not start with '$' (MongoDB): {', '.join(operators)}"
    try:
        document["_id"] = document_id(data_type, document)
    except ValueError as error:
        return None, str(error)
    return {"type": data_type, **document}, None


def document_id(data_type: str, document: dict) -> str:
    """The warehouse id of an ingested document, the same on every ingest of the same line.

    A non-empty string is kept; Extended JSON `{"$oid": "<24 hex digits>"}` becomes its hex
    string; a missing or null `_id` becomes a uuid5 of the type and the canonical JSON of
    the document (so re-ingesting a file replaces instead of duplicating); anything else is
    refused, because turning `0`, `true` or `""` into a string would change the id silently.
    """
    given = document.get("_id")
    if given is None:
        body = {k: v for k, v in document.items() if k != "_id"}
        canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return str(uuid.uuid5(_ID_NAMESPACE, f"{data_type}\n{canonical}"))
    if isinstance(given, str) and given:
        return given
    if isinstance(given, dict) and set(given) == {"$oid"}:
        oid = given["$oid"]
        if (
            isinstance(oid, str)
            and len(oid) == 24
            and all(c in "0123456789abcdefABCDEF" for c in oid)
        ):
            return oid.lower()
        raise ValueError(f"invalid _id: $oid must be 24 hexadecimal digits, got {oid!r}")
    raise ValueError(
        f"invalid _id {json.dumps(given)[:60]}: an id must be a non-empty string or "
        '{"$oid": "<24 hex digits>"}; leave it out to get one derived from the content'
    )


def _nesting(value: object) -> int:
    """Depth of nested objects and arrays, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_NESTING:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    batches: dict[str, list[dict]] = {t: [] for t in DATA_TYPES}
    bad = 0
    for location, document, error in read_documents(args.files):
        if error:
            bad += 1
            _err(f"{location}: {error}")
            continue
        assert document is not None
        data_type = document.pop("type")
        batches[data_type].append(document)
    events = []
    with _warehouse(settings) as warehouse:
        for data_type, documents in batches.items():
            collection = warehouse.documents(data_type)
            existing = collection.ids() if documents else set()
            collection.replace_many(documents)
            events += [
                _event(data_type, d["_id"], "replace" if d["_id"] in existing else "insert")
                for d in documents
            ]
    counts = ", ".join(f"{t}: {len(d)}" for t, d in batches.items())
    print(f"ingested {len(events)} documents ({counts}); {bad} bad lines skipped")
    published = _publish(events, settings, args.no_publish, replay="llm-twin-features backfill")
    return 1 if bad or not published else 0


def cmd_delete(args: argparse.Namespace, settings: Settings) -> int:
    with _warehouse(settings) as warehouse:
        collection = warehouse.documents(args.type)
        present = {str(d["_id"]) for d in collection.find(args.ids, fields=["_id"])}
        collection.delete_many(present)
    missing = [i for i in args.ids if i not in present]
    print(f"deleted {len(present)} {args.type} documents from the warehouse")
    if missing:
        _err(
            f"not in the warehouse: {', '.join(missing)} (delete events are sent anyway, so "
            "features left from earlier are removed)"
        )
    events = [_event(args.type, i, "delete") for i in args.ids]
    published = _publish(events, settings, args.no_publish, replay="llm-twin-features backfill")
    return 1 if missing or not published else 0


def _event(data_type: str, entry_id: str, op: str):
    from llm_twin_features.events.schema import ChangeEvent

    return ChangeEvent(type=data_type, entry_id=entry_id, op=op)


def _publish(events: list, settings: Settings, skip: bool, replay: str) -> bool:
    """Publishes change events after the warehouse write; False (and how to replay) on failure."""
    if skip or not events:
        return True
    from llm_twin_features.stores.queue import BrokerUnavailable, EventPublisher

    broker = settings.broker_config()
    try:
        with EventPublisher(broker) as publisher:
            publisher.publish(events)
    except BrokerUnavailable as error:
        _err(
            f"error: {error}\n{len(events)} change events were NOT published; the warehouse "
            f"write stands. Replay with `{replay}` (rebuilds from the warehouse), or re-run "
            "this command once RabbitMQ is up."
        )
        return False
    print(f"published {len(events)} change events to {broker.address}/{broker.queue}")
    return True


def cmd_cdc(args: argparse.Namespace, settings: Settings) -> int:
    import logging
    import signal
    import threading

    from llm_twin_features.events import cdc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    broker = settings.broker_config()
    with _warehouse(settings) as warehouse:
        try:
            cdc.require_replica_set(warehouse)
        except cdc.NotAReplicaSet as error:
            _err(f"error: {error}")
            return 2
        print(f"watching {settings.mongo_database} for changes -> {broker.address}/{broker.queue}")
        cdc.run(
            warehouse,
            broker,
            stop,
            on_event=lambda e: print(f"{e.op} {e.type}/{e.entry_id}", flush=True),
        )
    return 0


# --- backfill ----------------------------------------------------------------------------------


def prepare_dagster_home(settings: Settings) -> Path:
    """DAGSTER_HOME, defaulting to `<data dir>/dagster_home` with the repo's `dagster.yaml`."""
    home = Path(os.environ.get("DAGSTER_HOME") or settings.resolved_data_dir / "dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if not target.exists() and REPO_DAGSTER_YAML.exists():
        shutil.copyfile(REPO_DAGSTER_YAML, target)
    return home.resolve()


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    if args.ids and not args.type:
        _err("error: --ids needs --type")
        return 2
    data_types = [args.type] if args.type else list(DATA_TYPES)
    return run_pipeline(settings, dict.fromkeys(data_types, args.ids), trigger="cli-backfill")


def run_pipeline(settings: Settings, scopes: dict[str, list[str] | None], trigger: str) -> int:
    """One run of the pipeline job per data type (scoped to ids, or whole), with progress."""
    from llm_twin_features.runtime.local_stack import helper_model_server

    # First: the model loads in a helper process while Dagster is imported here.
    with helper_model_server(settings) as model_server:
        if model_server:
            print(
                f"{trigger}: loading the embedding model meanwhile, in {model_server}", flush=True
            )
        return _run_pipeline(settings, scopes, trigger)


def _run_pipeline(settings: Settings, scopes: dict[str, list[str] | None], trigger: str) -> int:
    home = prepare_dagster_home(settings)
    import dagster as dg

    from llm_twin_features.definitions import FEATURE_PIPELINE_JOB, build_definitions
    from llm_twin_features.defs.assets import FEATURE_STORE_POOL, feature_assets
    from llm_twin_features.runtime.dead_runs import release_dead_runs

    job = build_definitions().resolve_job_def(FEATURE_PIPELINE_JOB)
    failed = []
    total = len(scopes)
    stop_reaper = threading.Event()

    def reap() -> None:
        """A run blocks on a pool slot that a killed run still holds: free such slots, now
        and every few seconds while the runs go on."""
        with dg.DagsterInstance.from_config(str(home)) as own:
            while True:
                for run_id in release_dead_runs(own, [FEATURE_STORE_POOL]):
                    _err(f"released the pool slot of run {run_id}: its process is gone")
                if stop_reaper.wait(5):
                    return

    with dg.DagsterInstance.from_config(str(home)) as instance:
        # Started once the instance (and its tables) exist: the reaper opens its own.
        threading.Thread(target=reap, daemon=True, name="dead-run-reaper").start()
        print(f"{trigger}: {', '.join(scopes)} through the Dagster instance at {home}")
        for number, (data_type, ids) in enumerate(scopes.items(), start=1):
            what = "whole partition" if ids is None else f"{len(ids)} documents"
            print(
                f"[{number}/{total}] {data_type}: running {FEATURE_PIPELINE_JOB} ({what})",
                flush=True,
            )
            run_config: dict = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
            if ids is not None:
                scope = {"config": {"document_ids": ids}}
                run_config["ops"] = {asset.key.path[-1]: scope for asset in feature_assets}
            started = time.perf_counter()
            result = job.execute_in_process(
                instance=instance,
                partition_key=data_type,
                tags={"llm_twin/trigger": trigger},
                run_config=run_config,
                raise_on_error=False,
            )
            seconds = time.perf_counter() - started
            if not result.success:
                failed.append(data_type)
                _err(f"[{number}/{total}] {data_type}: FAILED (run {result.run_id})")
                continue
            summary = _materialization_summary(result)
            print(f"[{number}/{total}] {data_type}: done in {seconds:.1f} s: {summary}")
    stop_reaper.set()
    if failed:
        _err(f"{trigger} failed for {', '.join(failed)}; see the runs in the Dagster UI")
        return 1
    return 0


def _materialization_summary(result) -> str:
    metadata = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        metadata[materialization.asset_key.to_user_string()] = {
            k: v.value for k, v in materialization.metadata.items()
        }
    embedded = metadata.get("embedded_chunks", {})
    raw = metadata.get("raw_documents", {})
    return (
        f"{raw.get('documents_in_scope', 0)} documents, {raw.get('quarantined', 0)} quarantined, "
        f"{embedded.get('chunks', 0)} chunks, {embedded.get('vectors_embedded', 0)} embedded, "
        f"{embedded.get('vectors_reused', 0)} reused"
    )


# --- search ------------------------------------------------------------------------------------


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    from llm_twin_features.domain.dispatchers import EmbeddingDispatcher
    from llm_twin_features.stores.feature_store import vector_collection

    queries = [args.query] if args.query else [q.strip() for q in sys.stdin if q.strip()]
    if not queries:
        _err("no query: give QUERY or one query per line on stdin")
        return 2
    data_types = [args.type] if args.type else list(DATA_TYPES)
    with _feature_store(settings) as store:
        for query in queries:
            hits = []
            for data_type in data_types:
                collection = vector_collection(data_type)
                if not store.exists(collection):
                    continue
                embedder = EmbeddingDispatcher.embedder(data_type, settings)
                instruction = EmbeddingDispatcher.query_instruction(data_type, settings)
                vector = embedder.embed([query], query_instruction=instruction or "")[0]
                hits += store.search(collection, vector, args.limit, args.author)
            hits.sort(key=lambda h: -h.score)
            _print_hits(query, hits[: args.limit], args.json)
    return 0


def _print_hits(query: str, hits: list, as_json: bool) -> None:
    if not as_json:
        print(f"query: {query}")
        if not hits:
            print("  (no results: has the backfill run?)")
    for rank, hit in enumerate(hits, start=1):
        payload = hit.payload or {}
        # The chunk text is under `content`; `text` in points not rewritten since version 1.
        chunk_text = payload.get("content", payload.get("text"))
        if as_json:
            record = {
                "query": query,
                "rank": rank,
                "document_id": payload.get("document_id"),
                "score": round(hit.score, 6),
                "text": chunk_text,
                "type": payload.get("data_type"),
                "chunk_index": payload.get("chunk_index"),
            }
            print(json.dumps(record, ensure_ascii=False))
        else:
            text = " ".join((chunk_text or "").split())
            print(
                f"  {rank}. [{payload.get('data_type')}] {payload.get('document_id')} "
                f"score={hit.score:.3f}  {text[:160]}"
            )


# --- status ------------------------------------------------------------------------------------


def _audits(settings: Settings, data_types: list[str]) -> list:
    from llm_twin_features.domain.dispatchers import EmbeddingDispatcher
    from llm_twin_features.pipeline.audit import audit

    with _warehouse(settings) as warehouse, _feature_store(settings) as store:
        return [
            audit(
                warehouse,
                store,
                data_type,
                EmbeddingDispatcher.embedder(data_type, settings),
                settings.max_document_chars,
            )
            for data_type in data_types
        ]


def _print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    rows = [
        {
            "type": r.data_type,
            "warehouse": r.warehouse_documents,
            "quarantined": r.quarantined,
            "cleaned": r.cleaned_points,
            "chunks": r.chunks,
            "vectors": r.vectors,
            "missing": len(r.missing),
            "stale": len(r.stale),
            "orphans": len(r.orphans),
            "in_sync": r.in_sync,
        }
        for r in _audits(settings, list(DATA_TYPES))
    ]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        _print_table(rows)
    return 0


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 1 when the feature store has drifted from the warehouse. With --repair: runs the
    drifted documents again, audits again, and exits 1 only if drift remains (3 if a repair
    run failed)."""
    data_types = [args.type] if args.type else list(DATA_TYPES)
    reports = _audits(settings, data_types)
    if args.json:
        for report in reports:
            print(
                json.dumps(
                    {
                        "type": report.data_type,
                        "in_sync": report.in_sync,
                        **report.counts(),
                        "examples": report.examples(),
                    }
                )
            )
    else:
        _print_table(
            [
                {
                    "type": r.data_type,
                    **{k: len(v) for k, v in r.drift_kinds().items()},
                    "in_sync": r.in_sync,
                }
                for r in reports
            ]
        )
        for report in reports:
            for kind, ids in report.examples().items():
                print(
                    f"{report.data_type} {kind}: {', '.join(ids)}"
                    + (" ..." if len(report.drift[kind]) > len(ids) else "")
                )
    drifted = {r.data_type: r.drifted_ids for r in reports if not r.in_sync}
    if not drifted:
        return 0
    if not args.repair:
        _err("drift found; repair with `llm-twin-features audit --repair` (scoped runs)")
        return 1
    if run_pipeline(settings, drifted, trigger="audit-repair"):
        return 3
    remaining = {r.data_type: r.counts() for r in _audits(settings, data_types) if not r.in_sync}
    if remaining:
        _err(f"drift remains after the repair: {json.dumps(remaining)}")
        return 1
    print("repaired: the feature store matches the warehouse")
    return 0


# --- model server and local stack ---------------------------------------------------------------


def cmd_serve_models(args: argparse.Namespace, settings: Settings) -> int:
    import signal
    import threading

    from llm_twin_features.domain.embedding import encode_workers
    from llm_twin_features.runtime.model_server import serve

    models = list(dict.fromkeys([settings.embedding_model, settings.code_embedding_model]))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if args.exit_with_parent:
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    server = serve(
        args.host,
        args.port,
        preload=models,
        batch_size=settings.embedding_batch_size,
        workers=encode_workers(settings.embedding_workers),
    )
    print(
        f"model server on http://{args.host}:{args.port} (Ctrl-C to stop); "
        f"loading {', '.join(models)}",
        flush=True,
    )
    while not stop.is_set() and not server.loaded.wait(0.5):
        pass
    if server.load_error:
        _err(f"model server: could not load the models: {server.load_error}")
        server.shutdown()
        return 1
    if not stop.is_set():
        print("model server ready", flush=True)
    stop.wait()
    server.shutdown()
    return 0


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    """The laptop stack: the model server, then `dagster dev` (UI, daemon, sensor)."""
    import signal

    from llm_twin_features.runtime.local_stack import LocalStack

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    # Explicit handlers: a background job inherits SIGINT ignored, and SIGTERM should stop
    # the children too.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)

    home = prepare_dagster_home(settings)
    with LocalStack(settings, dagster_home=home, ui_port=args.port) as stack:
        print(f"Dagster UI on http://127.0.0.1:{args.port} (Ctrl-C stops everything)", flush=True)
        return stack.wait()


# --- entry point -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-twin-features",
        description="Keep an LLM twin's Qdrant feature store in sync with its MongoDB warehouse.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser(
        "ingest", help="write JSONL documents into the warehouse and publish change events"
    )
    ingest.add_argument("files", nargs="+", metavar="FILE")
    ingest.add_argument("--no-publish", action="store_true", help="do not publish events")
    ingest.set_defaults(handler=cmd_ingest)

    delete = commands.add_parser(
        "delete", help="delete documents from the warehouse and publish change events"
    )
    delete.add_argument("ids", nargs="+", metavar="ID")
    delete.add_argument("--type", choices=DATA_TYPES, required=True)
    delete.add_argument("--no-publish", action="store_true", help="do not publish events")
    delete.set_defaults(handler=cmd_delete)

    cdc = commands.add_parser(
        "cdc", help="publish MongoDB change-stream events to RabbitMQ (needs a replica set)"
    )
    cdc.set_defaults(handler=cmd_cdc)

    backfill = commands.add_parser("backfill", help="rebuild features for data types via Dagster")
    backfill.add_argument("--type", choices=DATA_TYPES)
    backfill.add_argument("--ids", nargs="+", metavar="ID", help="only these documents (--type)")
    backfill.set_defaults(handler=cmd_backfill)

    audit = commands.add_parser(
        "audit", help="compare the warehouse with every stage; exit 1 on drift"
    )
    audit.add_argument("--type", choices=DATA_TYPES)
    audit.add_argument("--json", action="store_true", help="one JSON object per type")
    audit.add_argument("--repair", action="store_true", help="run the drifted documents again")
    audit.set_defaults(handler=cmd_audit)

    search = commands.add_parser("search", help="semantic search over embedded chunks")
    search.add_argument("query", nargs="?", help="the query; omitted: one query per stdin line")
    search.add_argument("--type", choices=DATA_TYPES, help="search one data type only")
    search.add_argument("--limit", type=int, default=5)
    search.add_argument("--author", help="only chunks by this author id")
    search.add_argument("--json", action="store_true", help="one JSON object per result")
    search.set_defaults(handler=cmd_search)

    serve_models = commands.add_parser(
        "serve-models", help="keep the embedding models loaded for pipeline runs"
    )
    serve_models.add_argument("--host", default="127.0.0.1")
    serve_models.add_argument("--port", type=int, default=8765)
    # For a helper server: stop when stdin ends, i.e. when the process that started it is gone.
    serve_models.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    serve_models.set_defaults(handler=cmd_serve_models)

    dev = commands.add_parser("dev", help="model server + Dagster UI, daemon and sensor")
    dev.add_argument("--port", type=int, default=3000)
    dev.set_defaults(handler=cmd_dev)

    status = commands.add_parser("status", help="per-type counts and drift")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    try:
        return args.handler(args, settings)
    except (OSError, RuntimeError, ValueError) as error:
        _err(f"error: {error}")
        return 1
    except sqlite3.Error as error:  # an embedded store's file, where no adapter said more
        _err(
            f"error: a local store under {settings.resolved_data_dir} failed: {error}; free some "
            "disk space and check that the folder is writable, then run the command again"
        )
        return 1
    except Exception as error:
        if not type(error).__module__.startswith("sqlalchemy"):
            raise
        reason = str(getattr(error, "orig", None) or error).splitlines()[0]
        home = os.environ.get("DAGSTER_HOME") or settings.resolved_data_dir / "dagster_home"
        _err(
            f"error: Dagster's storage under {home} failed: {reason}; free some disk space and "
            "check that DAGSTER_HOME is writable, then run the command again"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
