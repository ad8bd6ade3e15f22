"""The model server under concurrent clients (issue 13, part 4).

Starts `llm-twin-features serve-models` (the real bundled all-MiniLM-L6-v2, the server's own
batch size and encode workers, as a run's backfill or the laptop stack would have them) and
measures embedding throughput (chunks/s) and latency per request with 1, 2 and 4 concurrent
clients. Each client is a thread with its own `RemoteModel` (stores/model_client.py, one
kept-alive connection, as each run worker has) that sends slices of 64 chunk texts for
`--seconds` (30 by default). The texts are the bench corpus' chunks (bench/generate_corpus.py
defaults, cleaned and chunked as the pipeline does, through the server's tokenizer).

The server runs one encode at a time (a lock: each encode already uses every core), so on a
CPU the throughput should stay flat and the latency grow with the number of clients.

    .venv/bin/python bench/model_server_load.py
    .venv/bin/python bench/model_server_load.py --clients 1 2 4 8 --seconds 20

Results: bench/.work/model_server_load.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.generate_corpus import generate  # noqa: E402
from bench.run import CLI, log, percentile  # noqa: E402
from llm_twin_features.domain.embedding import BUNDLED_MODEL  # noqa: E402
from llm_twin_features.stores.model_client import RemoteModel  # noqa: E402

RESULTS = ROOT / "bench" / ".work" / "model_server_load.json"


def start_server(port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`serve-models` in a child that exits when our end of its stdin closes."""
    with open(log_path, "w") as server_log:
        process = subprocess.Popen(
            [CLI, "serve-models", "--port", str(port), "--exit-with-parent"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=server_log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the model server exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                if reply.status == 200:
                    return process
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError("the model server did not load its model within 300 s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    assert process.stdin is not None
    process.stdin.close()  # --exit-with-parent: it stops at the end of its stdin
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def corpus_chunks(model: RemoteModel, seed: int) -> list[str]:
    """The bench corpus' chunks, cleaned and chunked as the pipeline does (with the model's
    tokenizer, through the server), in a shuffled order."""
    from llm_twin_features.domain.chunking import TokenWindow, chunk_text
    from llm_twin_features.domain.data_types import spec_of

    window = TokenWindow(tokenizer=model.tokenizer, tokens_per_chunk=model.max_seq_length - 2)
    texts = []
    for document in generate(150, 120, 30, seed=7):
        spec = spec_of(document["type"])
        texts += chunk_text(spec.clean(document["content"]), spec.chunking, window)
    random.Random(seed).shuffle(texts)
    return texts


def server_cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def run_level(
    url: str, texts: list[str], clients: int, seconds: float, slice_size: int, server_pid: int
) -> dict[str, Any]:
    """`clients` threads send slices of `slice_size` texts for `seconds`; every request
    started before the end is counted, and the time runs until the last one answered."""
    models = [RemoteModel(url, BUNDLED_MODEL) for _ in range(clients)]
    records: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    start = time.perf_counter() + 0.5
    deadline = start + seconds
    errors: list[BaseException] = []

    def client(number: int) -> None:
        position = number * len(texts) // clients
        time.sleep(max(start - time.perf_counter(), 0))
        try:
            while time.perf_counter() < deadline:
                batch = [texts[(position + i) % len(texts)] for i in range(slice_size)]
                position += slice_size
                sent = time.perf_counter()
                vectors = models[number].encode(
                    batch, batch_size=slice_size, normalize_embeddings=True
                )
                answered = time.perf_counter()
                assert vectors.shape == (len(batch), models[number].get_embedding_dimension())
                with lock:
                    records.append((sent, answered, len(batch)))
        except BaseException as error:  # reported after the level
            errors.append(error)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    cpu_before = server_cpu_seconds(server_pid)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    elapsed = max(answered for _, answered, _ in records) - start
    cpu = server_cpu_seconds(server_pid) - cpu_before
    latencies = [answered - sent for sent, answered, _ in records]
    chunks = sum(n for _, _, n in records)
    return {
        "clients": clients,
        "requests": len(records),
        "chunks": chunks,
        "seconds": elapsed,
        "chunks_per_second": chunks / elapsed,
        "latency_p50_seconds": percentile(latencies, 0.5),
        "latency_p95_seconds": percentile(latencies, 0.95),
        "server_cpu_cores": cpu / elapsed,
    }


def table(levels: list[dict[str, Any]]) -> str:
    base = levels[0]["chunks_per_second"]
    lines = [
        "| clients | requests | chunks | seconds | chunks/s | vs 1 client | p50 latency/request "
        "| p95 | server CPU (cores) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in levels:
        lines.append(
            f"| {level['clients']} | {level['requests']} | {level['chunks']:,} "
            f"| {level['seconds']:.1f} | {level['chunks_per_second']:.1f} "
            f"| {level['chunks_per_second'] / base:.2f}x | {level['latency_p50_seconds']:.2f} s "
            f"| {level['latency_p95_seconds']:.2f} s | {level['server_cpu_cores']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=30.0, help="per client count")
    parser.add_argument("--slice", type=int, default=64, help="texts per request")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()

    from llm_twin_features.runtime.local_stack import free_port
    from llm_twin_features.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="llm_twin_model_load_"))
    env = {**os.environ, "LLM_TWIN_DATA_DIR": str(work / "data"), "HF_HUB_OFFLINE": "1"}
    for name in ("EMBEDDING_MODEL", "CODE_EMBEDDING_MODEL", "EMBEDDING_SERVICE_URL"):
        env.pop(name, None)  # the bundled model, loaded once
    port = free_port()
    log(f"starting the model server on port {port}")
    server = start_server(port, env, work / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        probe = RemoteModel(url, BUNDLED_MODEL)
        texts = corpus_chunks(probe, args.seed)
        tokens = [len(ids) for ids in probe.tokenizer(texts)["input_ids"]]
        log(
            f"{len(texts)} chunk texts, tokens per chunk: median {percentile(tokens, 0.5)}, "
            f"mean {sum(tokens) / len(tokens):.0f}, p95 {percentile(tokens, 0.95)}"
        )
        probe.encode(texts[: args.slice])  # warm-up
        levels = []
        for clients in args.clients:
            log(f"{clients} client(s) for {args.seconds:.0f} s")
            levels.append(run_level(url, texts, clients, args.seconds, args.slice, server.pid))
            log(json.dumps(levels[-1]))
    finally:
        stop_server(server)
        shutil.rmtree(work, ignore_errors=True)
    settings = Settings()
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": BUNDLED_MODEL,
        "server_batch_size": settings.embedding_batch_size,
        "server_encode_workers": settings.embedding_workers or "one per core",
        "cores": len(os.sched_getaffinity(0)),
        "texts": len(texts),
        "tokens_per_chunk_median": percentile(tokens, 0.5),
        "tokens_per_chunk_mean": sum(tokens) / len(tokens),
        "slice": args.slice,
        "seconds_per_level": args.seconds,
        "levels": levels,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(table(levels))


if __name__ == "__main__":
    main()
