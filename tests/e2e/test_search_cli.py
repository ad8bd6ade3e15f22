"""`search` on the laptop: it finds the stack's model server by itself (which answers a
single query: no model loaded, no Qdrant client imported in the command), and answers
queries from stdin as they come."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from llm_twin_features.runtime.local_stack import free_port

from ..conftest import SAMPLE_CORPUS

LOADS_NO_MODEL = (
    "import sys; from llm_twin_features import cli; code = cli.main(sys.argv[1:]); "
    "print('IMPORTED-SENTENCE-TRANSFORMERS', 'sentence_transformers' in sys.modules); "
    "print('IMPORTED-QDRANT', 'qdrant_client' in sys.modules); "
    "print('IMPORTED-TORCH', 'torch' in sys.modules); "
    "sys.exit(code)"
)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def cli_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MONGO_URI", "QDRANT_URL")}
    env.pop("EMBEDDING_SERVICE_URL", None)
    return {**env, "LLM_TWIN_DATA_DIR": str(data_dir), "DAGSTER_HOME": str(data_dir / "home")}


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("search") / "data"
    env = cli_env(data_dir)
    cli = [sys.executable, "-m", "llm_twin_features.cli"]
    subprocess.run([*cli, "ingest", "--no-publish", str(SAMPLE_CORPUS)], env=env, check=True)
    subprocess.run([*cli, "backfill", "--type", "posts"], env=env, check=True)
    return data_dir


def test_search_uses_the_running_stacks_model_server(backfilled: Path):
    env = cli_env(backfilled)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "llm_twin_features.cli", "serve-models", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not healthy(url):  # until its model is loaded
            assert server.poll() is None and time.monotonic() < deadline, "no model server"
            time.sleep(0.5)
        # What `llm-twin-features dev` publishes for commands over the same data dir.
        (backfilled / "model_server.url").write_text(url)
        search = [sys.executable, "-c", LOADS_NO_MODEL, "search", "vector database", "--json"]
        found = subprocess.run(search, env=env, capture_output=True, text=True, timeout=120)
        assert found.returncode == 0, found.stderr
        assert "IMPORTED-SENTENCE-TRANSFORMERS False" in found.stdout
        assert "IMPORTED-QDRANT False" in found.stdout  # the server searched
        hits = [json.loads(line) for line in found.stdout.splitlines() if line.startswith("{")]
        assert hits and {hit["mode"] for hit in hits} == {"hybrid"}
        # Another query configuration than the server's: it embeds through the server but
        # searches itself (the server refuses to answer for other settings).
        other = {**env, "CODE_QUERY_INSTRUCTION": "Represent the question:"}
        found = subprocess.run(search, env=other, capture_output=True, text=True, timeout=120)
        assert found.returncode == 0, found.stderr
        assert "IMPORTED-SENTENCE-TRANSFORMERS False" in found.stdout
        assert "IMPORTED-QDRANT True" in found.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
    # The server is gone: the stale file is ignored and the command embeds the query itself,
    # in NumPy (no torch imported) for the bundled model.
    found = subprocess.run(search, env=env, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr
    assert "IMPORTED-TORCH False" in found.stdout and "IMPORTED-QDRANT True" in found.stdout
    assert any(line.startswith("{") for line in found.stdout.splitlines())


def test_queries_from_stdin_are_answered_as_they_come(backfilled: Path):
    process = subprocess.Popen(
        [sys.executable, "-m", "llm_twin_features.cli", "search", "--json", "--limit", "1"],
        env=cli_env(backfilled),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdin and process.stdout
    answers: list[dict] = []
    first = threading.Event()

    def read() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            answers.append(json.loads(line))
            first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        process.stdin.write("how do I keep a vector database in sync?\n")
        process.stdin.flush()
        # The first answer comes while stdin is still open (the old command read all of it).
        assert first.wait(timeout=300), "no answer before the end of stdin"
        process.stdin.write("fine-tuning an LLM on my posts\n")
        process.stdin.close()
        assert process.wait(timeout=120) == 0
        reader.join(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert [a["query"] for a in answers] == [
        "how do I keep a vector database in sync?",
        "fine-tuning an LLM on my posts",
    ]
