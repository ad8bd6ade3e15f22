"""`search`: semantic search in the `vector_{type}` collections."""

from __future__ import annotations

import argparse
import json
import sys

from llm_twin_features.cli.common import err, feature_store_of, with_running_model_server
from llm_twin_features.domain.data_types import data_types
from llm_twin_features.settings import Settings


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    settings = with_running_model_server(settings)
    chosen = [args.type] if args.type else list(data_types())
    # One query while the laptop stack runs: its model server answers it, with the models
    # loaded and qdrant-client imported (a second less than importing it here).
    if (
        args.query
        and settings.embedding_service_url
        and _search_through_server(args, chosen, settings)
    ):
        return 0

    from llm_twin_features.pipeline.retrieval import Searcher

    # Queries from stdin are answered as they come, each printed (and flushed) at once.
    queries = [args.query] if args.query else (q.strip() for q in sys.stdin if q.strip())
    answered = 0
    with feature_store_of(settings) as store:
        searcher = Searcher(store, chosen, settings, args.mode)
        if searcher.mode != args.mode:
            err(MIXED_COLLECTIONS)
        for query in queries:
            answered += 1
            print_hits(query, searcher(query, args.limit, args.author), args.json, searcher.mode)
            sys.stdout.flush()
    if not answered:
        err("no query: give QUERY or one query per line on stdin")
        return 2
    return 0


MIXED_COLLECTIONS = (
    "search: some collections have no sparse vectors yet (written before hybrid search); "
    "run `llm-twin-features backfill` to add them. Searching dense."
)


def _search_through_server(args: argparse.Namespace, chosen: list[str], settings: Settings) -> bool:
    """Whether the model server at `EMBEDDING_SERVICE_URL` answered the query (False: it is
    busy, of another data dir or configuration, or gone; the caller searches itself)."""
    import urllib.request
    from types import SimpleNamespace

    body = {
        "query": args.query,
        "types": chosen,
        "limit": args.limit,
        "author": args.author,
        "mode": args.mode,
        "identity": settings.search_identity(),
    }
    request = urllib.request.Request(
        f"{settings.embedding_service_url}/search",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            reply = json.load(response)
    except (OSError, ValueError):
        return False
    if reply["mode"] != args.mode:
        err(MIXED_COLLECTIONS)
    hits = [SimpleNamespace(**hit) for hit in reply["hits"]]
    print_hits(args.query, hits, args.json, reply["mode"])
    return True


def print_hits(query: str, hits: list, as_json: bool, mode: str) -> None:
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
                "dense_score": None if hit.dense_score is None else round(hit.dense_score, 6),
                "mode": mode,
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
