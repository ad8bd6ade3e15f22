"""The model server's client: the slice of the SentenceTransformer interface the pipeline
uses, served by `llm-twin-features serve-models` (runtime/model_server.py), and the loader
that prefers it when `EMBEDDING_SERVICE_URL` names one."""

from __future__ import annotations

import functools
import http.client
import json
import logging
import urllib.parse
from collections.abc import Callable
from typing import Any

import numpy as np

from llm_twin_features.domain.embedding import load_local_model

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0


class ModelServiceUnavailable(RuntimeError):
    pass


class _RemoteTokenizer:
    """Takes a text or a list of texts, like a Hugging Face tokenizer; one request per call."""

    def __init__(self, model: RemoteModel) -> None:
        self._model = model

    def __call__(self, texts: str | list[str], add_special_tokens: bool = True, **_: Any) -> dict:
        single = isinstance(texts, str)
        body = {"texts": [texts] if single else texts, "add_special_tokens": add_special_tokens}
        reply = self._model.call("/tokenize", body)
        return {key: value[0] for key, value in reply.items()} if single else reply


class RemoteModel:
    """The slice of the SentenceTransformer interface the pipeline uses, served remotely."""

    def __init__(self, url: str, model_id: str, timeout: float = 600.0) -> None:
        """Fails fast (`ModelServiceUnavailable`) when nothing listens at `url`; waits up to
        `timeout` for a server that is still loading the model."""
        self.url = url.rstrip("/")
        self.model_id = model_id
        self.timeout = timeout
        self._address = urllib.parse.urlsplit(self.url)
        self._connection: http.client.HTTPConnection | None = None
        self.tokenizer = _RemoteTokenizer(self)
        info = self.call("/info", {})
        self.max_seq_length = info["max_seq_length"]
        self._dimension = info["dimension"]

    def call(self, path: str, body: dict, timeout: float | None = None) -> dict:
        """One JSON request on a kept-alive connection (reopened once if it went stale)."""
        payload = json.dumps({"model": self.model_id, **body}).encode()
        for attempt in (1, 2):
            try:
                if self._connection is None:
                    host, port = self._address.hostname, self._address.port or 80
                    if host is None:  # e.g. "localhost:8001": no scheme, so no host
                        message = f"model server {self.url}: no host in the URL (http://host:port)"
                        raise ModelServiceUnavailable(message)
                    self._connection = http.client.HTTPConnection(host, port)
                if self._connection.sock is None:
                    self._connection.timeout = CONNECT_TIMEOUT  # nothing listening: fail fast
                    self._connection.connect()
                # Per request: a reply may take long (a 512-text slice, a model loading).
                self._connection.sock.settimeout(timeout or self.timeout)
                self._connection.request(
                    "POST", path, payload, {"Content-Type": "application/json"}
                )
                response = self._connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as error:
                self._connection = None
                if attempt == 2 or isinstance(error, ConnectionRefusedError | TimeoutError):
                    message = f"model server {self.url} unreachable: {error}"
                    raise ModelServiceUnavailable(message) from error
                continue
            if response.status != 200:
                detail = data.decode(errors="replace")
                raise ModelServiceUnavailable(f"model server {self.url}{path}: {detail}")
            return json.loads(data)
        raise AssertionError("not reached")

    def get_embedding_dimension(self) -> int:
        return self._dimension

    def encode(self, texts: list[str], prompt: str | None = None, **_: Any) -> np.ndarray:
        """Batch size and workers are the server's (see `serve`)."""
        reply = self.call("/embed", {"texts": texts, "prompt": prompt})
        return np.asarray(reply["vectors"], dtype=np.float32)


def load_model(model_id: str, service_url: str | None = None) -> Any:
    """The model served at `service_url` when it answers, else a local instance."""
    if service_url:
        try:
            return RemoteModel(service_url, model_id)
        except ModelServiceUnavailable as error:
            log.warning("%s; loading %s in this process instead", error, model_id)
    return load_local_model(model_id)


def model_loader(service_url: str | None) -> Callable[[str], Any]:
    """An `Embedder` loader: through the model server at `service_url`, if any."""
    if not service_url:
        return load_local_model
    return functools.partial(load_model, service_url=service_url)
