"""The model server and its client: same tokens and vectors as the in-process model."""

import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from llm_twin_features.domain.chunking import ChunkingConfig, TokenWindow, chunk_text
from llm_twin_features.domain.embedding import BUNDLED_MODEL, Embedder, load_local_model
from llm_twin_features.runtime.local_stack import free_port
from llm_twin_features.runtime.model_server import serve
from llm_twin_features.settings import INSTRUCTOR_CODE_INSTRUCTION
from llm_twin_features.stores.model_client import (
    ModelServiceUnavailable,
    RemoteModel,
    load_model,
    model_loader,
)

TEXTS = ["Qdrant stores the vectors.", "MongoDB keeps the raw documents; RabbitMQ the events."]


@pytest.fixture(scope="module")
def url():
    port = free_port()
    server = serve("127.0.0.1", port, preload=[BUNDLED_MODEL], batch_size=4, workers=2)
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


def test_remote_vectors_equal_local_ones(url):
    remote = Embedder(BUNDLED_MODEL, INSTRUCTOR_CODE_INSTRUCTION, loader=model_loader(url))
    local = Embedder(BUNDLED_MODEL, INSTRUCTOR_CODE_INSTRUCTION)
    assert isinstance(remote.model, RemoteModel)
    assert np.allclose(remote.embed(TEXTS), local.embed(TEXTS), atol=1e-6)
    assert (remote.dimension, remote.max_text_tokens) == (local.dimension, local.max_text_tokens)
    assert remote.signature == local.signature  # where a vector came from does not matter


def test_each_request_gets_its_own_timeout(url):
    """The kept-alive socket is opened with a 5 s connect timeout; a call must not inherit it
    (a 512-text slice, or a model still loading, takes longer)."""
    remote = RemoteModel(url, BUNDLED_MODEL, timeout=321.0)
    remote.encode(TEXTS)
    assert remote._connection.sock.gettimeout() == 321.0


def test_remote_tokenizer_gives_the_same_chunks(url):
    remote = RemoteModel(url, BUNDLED_MODEL)
    local = load_local_model(BUNDLED_MODEL)
    text = "Token windows slice the original text. " * 120
    windows = [
        TokenWindow(tokenizer=model.tokenizer, tokens_per_chunk=64) for model in (remote, local)
    ]
    config = ChunkingConfig(chunk_size=2000)
    assert chunk_text(text, config, windows[0]) == chunk_text(text, config, windows[1])


def test_errors_are_reported_not_swallowed(url):
    with pytest.raises(ModelServiceUnavailable, match=r"model server .*/info: .*Error"):
        RemoteModel(url, "/no/such/model/directory")


def test_unreachable_server_falls_back_to_a_local_model(caplog):
    with caplog.at_level(logging.WARNING):
        model = load_model(BUNDLED_MODEL, f"http://127.0.0.1:{free_port()}")
    assert model is load_local_model(BUNDLED_MODEL)
    assert "unreachable" in caplog.text
    assert "loading bundled:all-MiniLM-L6-v2 in this process" in caplog.text


def test_concurrent_tokenize_and_embed_requests_all_succeed(url):
    """A run's tokenize calls arrive while another run's embed (two encode workers) is
    tokenizing: older fast tokenizers raised "Already borrowed" when two threads used one at
    once (huggingface/tokenizers#537); the pinned ones must not."""
    text = "Chunks are cut by the model's own tokenizer, then embedded in batches. " * 20

    def tokenize(_: int) -> int:
        client = RemoteModel(url, BUNDLED_MODEL)
        return sum(len(client.tokenizer([text] * 8)["input_ids"]) for _ in range(20))

    def embed(_: int) -> int:
        return len(RemoteModel(url, BUNDLED_MODEL).encode([text] * 24))

    with ThreadPoolExecutor(8) as pool:
        tokenized = [pool.submit(tokenize, i) for i in range(6)]
        embedded = [pool.submit(embed, i) for i in range(2)]
        assert [f.result() for f in tokenized] == [160] * 6
        assert [f.result() for f in embedded] == [24, 24]


def test_a_server_still_loading_says_so_and_clients_wait_for_it(caplog):
    """`serve-models` listens before it loads: /health answers 503 until the model is loaded,
    and a client that connects meanwhile waits for it instead of loading its own copy."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "llm_twin_features.cli", "serve-models", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        statuses = []
        deadline = time.monotonic() + 60
        while not statuses:
            assert time.monotonic() < deadline and server.poll() is None, "never listened"
            try:
                statuses.append(urllib.request.urlopen(url + "/health", timeout=5).status)
            except urllib.error.HTTPError as error:
                statuses.append(error.code)
            except OSError:
                time.sleep(0.05)
        assert statuses == [503]  # listening, still importing and loading the model
        with caplog.at_level(logging.WARNING):
            remote = Embedder(BUNDLED_MODEL, loader=model_loader(url))
            vectors = remote.embed(TEXTS)
        assert isinstance(remote.model, RemoteModel) and "instead" not in caplog.text
        assert np.allclose(vectors, Embedder(BUNDLED_MODEL).embed(TEXTS), atol=1e-6)
        assert urllib.request.urlopen(url + "/health", timeout=5).status == 200
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0
    assert "model server ready" in output
