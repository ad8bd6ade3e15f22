"""A small model server, so that pipeline runs do not load models themselves.

Every Dagster run is a fresh process: importing torch and loading a model costs it about 2 s
(4-6 s more through sentence-transformers, minutes for instructor-xl), which would dominate
event-run latency. With
`EMBEDDING_SERVICE_URL` set, runs tokenize and embed through this server, which keeps each
model loaded once. If the server cannot be reached, runs fall back to loading the model
in-process (slower, same vectors).

`llm-twin-features serve-models` runs it; `llm-twin-features dev` starts it next to `dagster
dev`; docker compose runs it as the `models` service. JSON over HTTP, standard library only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from llm_twin_features.domain.embedding import DEFAULT_BATCH_SIZE

log = logging.getLogger(__name__)


# --- server ------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a run makes many small tokenize calls
    # Headers and body leave in two writes: without TCP_NODELAY each small reply waits ~40 ms
    # for the client's delayed ACK (Nagle), which made chunking through the server crawl.
    disable_nagle_algorithm = True
    encode_lock = threading.Lock()  # one encode at a time: each uses every core

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        # The client may have given up waiting (a health probe's timeout): nothing to tell it.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(data)

    def do_GET(self) -> None:
        from llm_twin_features.domain.embedding import loaded_models

        if self.path == "/health":
            if not self.server.loaded.is_set():  # type: ignore[attr-defined]
                self._reply(503, {"status": "loading", "models": loaded_models()})
            elif self.server.load_error:  # type: ignore[attr-defined]
                self._reply(500, {"status": "failed", "error": self.server.load_error})  # type: ignore[attr-defined]
            else:
                self._reply(200, {"status": "ok", "models": loaded_models()})
        else:
            self._reply(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        from llm_twin_features.domain.embedding import encode, load_local_model

        try:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if self.path == "/search":
                self._reply(*_search(request))
                return
            model = load_local_model(request["model"])
            if self.path == "/tokenize":
                encoded = model.tokenizer(
                    request["texts"],
                    add_special_tokens=request.get("add_special_tokens", True),
                    return_offsets_mapping=True,
                    verbose=False,
                )
                self._reply(
                    200,
                    {
                        "input_ids": [list(ids) for ids in encoded["input_ids"]],
                        "offset_mapping": [
                            [list(span) for span in spans] for spans in encoded["offset_mapping"]
                        ],
                    },
                )
            elif self.path == "/info":
                length, dimension = model.max_seq_length, model.get_embedding_dimension()
                if length is None or dimension is None:
                    raise ValueError(f"{request['model']} declares no input length or dimension")
                self._reply(200, {"max_seq_length": int(length), "dimension": int(dimension)})
            elif self.path == "/embed":
                with self.encode_lock:
                    vectors = encode(
                        model,
                        request["texts"],
                        request.get("prompt"),
                        self.server.encode_batch_size,  # type: ignore[attr-defined]
                        self.server.encode_workers,  # type: ignore[attr-defined]
                    )
                self._reply(200, {"vectors": vectors.tolist()})
            else:
                self._reply(404, {"error": f"no route {self.path}"})
        except Exception as error:  # a bad request must not kill the server
            log.exception("model server request failed")
            self._reply(500, {"error": f"{type(error).__name__}: {error}"})


_search_lock = threading.Lock()  # Qdrant local admits one open client per process too


def _search(request: dict) -> tuple[int, dict]:
    """A search answered here, for the CLI: with the models loaded and qdrant-client imported
    it costs the time of the search. Only for a caller with the same feature store and query
    models (409 otherwise); 503 when the feature store is held by a run for long."""
    from dataclasses import asdict

    from llm_twin_features.pipeline.retrieval import Searcher
    from llm_twin_features.settings import Settings
    from llm_twin_features.stores.feature_store import FeatureStoreUnavailable, open_feature_store

    settings = Settings().model_copy(update={"embedding_service_url": None})
    if request.get("identity") != settings.search_identity():
        return 409, {"error": "this server searches another feature store or with other models"}
    api_key = settings.qdrant_api_key_value()
    with _search_lock:
        try:
            store = open_feature_store(
                settings.qdrant_url, api_key, settings.resolved_data_dir, lock_timeout=5
            )
        except FeatureStoreUnavailable as error:
            return 503, {"error": str(error)}
        try:
            searcher = Searcher(store, request["types"], settings, request["mode"])
            hits = searcher(request["query"], request["limit"], request.get("author"))
        finally:
            store.close()
    return 200, {"mode": searcher.mode, "hits": [asdict(hit) for hit in hits]}


def serve(
    host: str, port: int, preload: list[str], batch_size: int = DEFAULT_BATCH_SIZE, workers: int = 1
) -> ThreadingHTTPServer:
    """Listens at once and loads `preload` models in the background; returns the started
    server (call `shutdown()` to stop).

    Until the models are loaded `/health` answers 503 and a request waits for the model it
    needs rather than being refused: a client started alongside (a backfill, a run during
    compose start-up) waits for the one copy instead of loading a model of its own.
    The server batches as its own settings say, not as clients ask: it knows its device."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.encode_batch_size = batch_size  # type: ignore[attr-defined]
    server.encode_workers = workers  # type: ignore[attr-defined]
    server.loaded = threading.Event()  # type: ignore[attr-defined]
    server.load_error = None  # type: ignore[attr-defined]

    def load() -> None:
        from llm_twin_features.domain.embedding import load_local_model

        try:
            for model_id in dict.fromkeys(preload):
                load_local_model(model_id).encode(["warm-up"], show_progress_bar=False)
        except Exception as error:  # reported by /health; requests load (and fail) on their own
            log.exception("model server could not load its models")
            server.load_error = f"{type(error).__name__}: {error}"  # type: ignore[attr-defined]
        server.loaded.set()  # type: ignore[attr-defined]

    threading.Thread(target=load, daemon=True, name="model-loader").start()
    threading.Thread(target=server.serve_forever, daemon=True, name="model-server").start()
    return server
