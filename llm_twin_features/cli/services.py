"""Long-running services: the CDC publisher, the model server and the laptop stack."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Protocol, cast

from llm_twin_features.cli.common import err, prepare_dagster_home, warehouse_of
from llm_twin_features.settings import Settings


class _ModelServer(Protocol):
    """What `runtime.model_server.serve` returns: an HTTP server given two attributes."""

    loaded: threading.Event  # set once the preloaded models are loaded (or failed to)
    load_error: str | None

    def shutdown(self) -> None: ...


def cmd_cdc(args: argparse.Namespace, settings: Settings) -> int:
    import logging
    import signal

    from llm_twin_features.events import cdc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    broker = settings.broker_config()
    with warehouse_of(settings) as warehouse:
        try:
            cdc.require_replica_set(warehouse)
        except cdc.NotAReplicaSet as error:
            err(f"error: {error}")
            return 2
        print(f"watching {settings.mongo_database} for changes -> {broker.address}/{broker.queue}")
        cdc.run(
            warehouse,
            broker,
            stop,
            on_event=lambda e: print(f"{e.op} {e.type}/{e.entry_id}", flush=True),
        )
    return 0


def cmd_serve_models(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    from llm_twin_features.domain.embedding import encode_workers
    from llm_twin_features.runtime.model_server import serve

    models = list(dict.fromkeys([settings.embedding_model, settings.code_embedding_model]))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if args.exit_with_parent:

        def stop_at_stdin_eof() -> None:  # the parent closed our stdin: it is gone
            sys.stdin.read()
            stop.set()

        threading.Thread(target=stop_at_stdin_eof, daemon=True).start()
    server = cast(
        "_ModelServer",
        serve(
            args.host,
            args.port,
            preload=models,
            batch_size=settings.embedding_batch_size,
            workers=encode_workers(settings.embedding_workers),
        ),
    )
    print(
        f"model server on http://{args.host}:{args.port} (Ctrl-C to stop); "
        f"loading {', '.join(models)}",
        flush=True,
    )
    while not stop.is_set() and not server.loaded.wait(0.5):
        pass
    if server.load_error:
        err(f"model server: could not load the models: {server.load_error}")
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

    from llm_twin_features.cli.run_server import stop_run_server

    home = prepare_dagster_home(settings)
    if stop_run_server(settings):  # commands go through the stack from now on
        print("stopped the run server an earlier backfill left behind", flush=True)
    with LocalStack(settings, dagster_home=home, ui_port=args.port) as stack:
        print(f"Dagster UI on http://127.0.0.1:{args.port} (Ctrl-C stops everything)", flush=True)
        return stack.wait()
