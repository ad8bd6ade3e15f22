"""`make eval`: the retrieval eval of issue 14 on eval/corpus.jsonl and eval/queries.jsonl.

Ingests the corpus into an isolated data dir (eval/.work/data; its own DAGSTER_HOME with a
copy of ./dagster.yaml), backfills, then sends every query through ONE
`llm-twin-features search --json --limit 5` process on stdin (all types, as a user would
search), and reports recall@5 and MRR@5 (document level: the rank of the first of the 5
results from the query's document) per type and per query kind, and the time per query
(p50 and mean, the first query, which loads the model, left out).

    .venv/bin/python eval/run.py                 # our pipeline, through the CLI
    .venv/bin/python eval/run.py --naive         # and the naive baseline (eval/naive.py)
    .venv/bin/python eval/run.py --fresh         # start from an empty data dir
    .venv/bin/python eval/run.py -- --mode hybrid   # extra arguments passed to `search`

Results: eval/.work/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import CORPUS, ROOT, WORK, corpus, first_rank, metrics, queries, save_json, table

CLI = Path(sys.executable).parent / "llm-twin-features"  # the venv that runs this script


def environment() -> dict[str, str]:
    data = WORK / "data"
    home = data / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if k != "EMBEDDING_SERVICE_URL"}
    env.update(
        LLM_TWIN_DATA_DIR=str(data),
        DAGSTER_HOME=str(home),
        TOKENIZERS_PARALLELISM="false",
        RABBITMQ_QUEUE="llm_twin_eval",  # never used (--no-publish), isolated anyway
    )
    return env


def run(args: list[str], env: dict[str, str]) -> None:
    print(f"$ llm-twin-features {' '.join(args)}", file=sys.stderr)
    started = time.perf_counter()
    subprocess.run([str(CLI), *args], env=env, cwd=ROOT, check=True)
    print(f"  ({time.perf_counter() - started:.1f} s)", file=sys.stderr)


def search_all(qs: list[dict], env: dict[str, str], extra: list[str]) -> tuple[list, list]:
    """One search process; each query written, its results read, before the next."""
    process = subprocess.Popen(
        [str(CLI), "search", "--json", "--limit", "5", *extra],
        env=env,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def reader() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    results, seconds = [], []
    for q in qs:
        text = " ".join(q["query"].split())
        started = time.perf_counter()
        process.stdin.write(text + "\n")  # type: ignore[union-attr]
        process.stdin.flush()  # type: ignore[union-attr]
        hits = []
        while len(hits) < 5:
            try:
                line = lines.get(timeout=120)
            except queue.Empty:
                break  # fewer than 5 results
            if line is None:
                raise SystemExit("search exited early")
            record = json.loads(line)
            hits.append(record)
            if record["rank"] == 5:
                break
        seconds.append(time.perf_counter() - started)
        results.append(hits)
    process.stdin.close()  # type: ignore[union-attr]
    process.wait(timeout=60)
    return results, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description="retrieval eval (issue 14)")
    parser.add_argument("--naive", action="store_true", help="also run the naive baseline")
    parser.add_argument("--naive-only", action="store_true", help="only the naive baseline")
    parser.add_argument("--fresh", action="store_true", help="empty the eval data dir first")
    parser.add_argument(
        "--modes", default="hybrid,dense", help="search modes to evaluate, comma-separated"
    )
    parser.add_argument("search_args", nargs="*", help="after --: passed to `search` (e.g. --mode)")
    args = parser.parse_args()
    qs = queries()
    out: dict[str, dict] = {}
    if not args.naive_only:
        if args.fresh:
            shutil.rmtree(WORK / "data", ignore_errors=True)
        env = environment()
        run(["ingest", "--no-publish", str(CORPUS)], env)
        started = time.perf_counter()
        run(["backfill"], env)
        backfill = time.perf_counter() - started
        for mode in args.modes.split(","):
            search_args = ["--mode", mode, *args.search_args]
            hits, seconds = search_all(qs, env, search_args)
            ranks = [
                first_rank([h["document_id"] for h in hs], q["document_id"])
                for hs, q in zip(hits, qs, strict=True)
            ]
            rest = seconds[1:] or seconds
            out[f"ours ({mode})"] = {
                "metrics": metrics(qs, ranks),
                "search_args": search_args,
                "backfill_seconds": round(backfill, 1),
                "first_query_seconds": round(seconds[0], 3),
                "query_seconds_p50": round(statistics.median(rest), 4),
                "query_seconds_mean": round(statistics.mean(rest), 4),
                "ranks": ranks,
            }
    if args.naive or args.naive_only:
        from naive import evaluate

        out["naive"] = evaluate(corpus(), qs)
    save_json(WORK / "results.json", out)
    docs = corpus()
    print(f"\n{len(docs)} documents, {len(qs)} queries; recall@5 / MRR@5 (document level)\n")
    print(table({name: r["metrics"] for name, r in out.items()}))
    rows = [
        *(
            f"{t}/{k}"
            for t in ("posts", "articles", "repositories")
            for k in ("exact", "paraphrase")
        )
    ]
    print()
    print(table({name: r["metrics"] for name, r in out.items()}, rows))
    for name, p in out.items():
        if name == "naive":
            continue
        print(
            f"\n{name}: time per query p50 {p['query_seconds_p50'] * 1000:.0f} ms, "
            f"mean {p['query_seconds_mean'] * 1000:.0f} ms (first query, model load included: "
            f"{p['first_query_seconds']:.1f} s); backfill {p['backfill_seconds']} s"
        )
    if "naive" in out:
        n = out["naive"]
        print(
            f"naive: {n['chunks']} chunks, built in {n['build_seconds']} s; "
            f"{n['search_seconds_per_query'] * 1000:.0f} ms per query (batched, brute force)"
        )
    print(f"\nresults: {WORK / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
