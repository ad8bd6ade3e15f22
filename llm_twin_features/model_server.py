"""A small model server, so that pipeline runs do not load models themselves.

Every Dagster run is a fresh process: importing sentence-transformers and loading a model
costs it ~5 s (minutes for instructor-xl), which dominates event-run latency. With
`EMBEDDING_SERVICE_URL` set, runs tokenize and embed through this server, which keeps each
model loaded once. If the server cannot be reached, runs fall back to loading the model
in-process (slower, same vectors).

`llm-twin-features serve-models` runs it; `llm-twin-features dev` starts it next to `dagster
dev`; docker compose runs it as the `models` service. JSON over HTTP, standard library only.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class ModelServiceUnavailable(RuntimeError):
    pass


# --- server ------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    encode_lock = threading.Lock()  # one encode at a time: torch already uses every core

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        from llm_twin_features.domain.embedding import loaded_models

        if self.path == "/health":
            self._reply(200, {"status": "ok", "models": loaded_models()})
        else:
            self._reply(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        from llm_twin_features.domain.embedding import load_local_model

        try:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            model = load_local_model(request["model"])
            if self.path == "/tokenize":
                encoded = model.tokenizer(
                    request["text"],
                    add_special_tokens=request.get("add_special_tokens", True),
                    return_offsets_mapping=True,
                    verbose=False,
                )
                self._reply(
                    200,
                    {
                        "input_ids": list(encoded["input_ids"]),
                        "offset_mapping": [list(o) for o in encoded["offset_mapping"]],
                    },
                )
            elif self.path == "/info":
                self._reply(
                    200,
                    {
                        "max_seq_length": int(model.max_seq_length),
                        "dimension": int(model.get_embedding_dimension()),
                    },
                )
            elif self.path == "/embed":
                with self.encode_lock:
                    vectors = model.encode(
                        request["texts"],
                        prompt=request.get("prompt"),
                        batch_size=int(request.get("batch_size", 64)),
                        normalize_embeddings=True,
                        show_progress_bar=False,
                        convert_to_numpy=True,
                    )
                self._reply(200, {"vectors": vectors.tolist()})
            else:
                self._reply(404, {"error": f"no route {self.path}"})
        except Exception as error:  # a bad request must not kill the server
            log.exception("model server request failed")
            self._reply(500, {"error": f"{type(error).__name__}: {error}"})


def serve(host: str, port: int, preload: list[str]) -> ThreadingHTTPServer:
    """Loads `preload` models, then returns a started server (call `shutdown()` to stop)."""
    from llm_twin_features.domain.embedding import load_local_model

    for model_id in dict.fromkeys(preload):
        model = load_local_model(model_id)
        model.encode(["warm-up"], show_progress_bar=False)
    server = ThreadingHTTPServer((host, port), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="model-server").start()
    return server


# --- client ------------------------------------------------------------------------------------


class _RemoteTokenizer:
    def __init__(self, model: RemoteModel) -> None:
        self._model = model

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict:
        return self._model.call(
            "/tokenize", {"text": text, "add_special_tokens": add_special_tokens}
        )


class RemoteModel:
    """The slice of the SentenceTransformer interface the pipeline uses, served remotely."""

    def __init__(self, url: str, model_id: str, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.model_id = model_id
        self.timeout = timeout
        self.tokenizer = _RemoteTokenizer(self)
        info = self.call("/info", {}, timeout=5.0)
        self.max_seq_length = info["max_seq_length"]
        self._dimension = info["dimension"]

    def call(self, path: str, body: dict, timeout: float | None = None) -> dict:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps({"model": self.model_id, **body}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise ModelServiceUnavailable(f"model server {self.url}{path}: {detail}") from error
        except (OSError, urllib.error.URLError) as error:
            raise ModelServiceUnavailable(
                f"model server {self.url} unreachable: {error}"
            ) from error

    def get_embedding_dimension(self) -> int:
        return self._dimension

    def encode(
        self, texts: list[str], prompt: str | None = None, batch_size: int = 64, **_: Any
    ) -> np.ndarray:
        reply = self.call("/embed", {"texts": texts, "prompt": prompt, "batch_size": batch_size})
        return np.asarray(reply["vectors"], dtype=np.float32)
