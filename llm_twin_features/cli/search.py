"""`search`: semantic search in the `vector_{type}` collections."""

from __future__ import annotations

import argparse
import json
import sys

from llm_twin_features.cli.common import err, feature_store_of, with_running_model_server
from llm_twin_features.domain.data_types import data_types
from llm_twin_features.settings import Settings


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    from llm_twin_features.pipeline.embedders import EmbeddingDispatcher
    from llm_twin_features.stores.feature_store import vector_collection

    settings = with_running_model_server(settings)
    # Queries from stdin are answered as they come, each printed (and flushed) at once.
    queries = [args.query] if args.query else (q.strip() for q in sys.stdin if q.strip())
    chosen = [args.type] if args.type else list(data_types())
    answered = 0
    with feature_store_of(settings) as store:
        for query in queries:
            answered += 1
            hits = []
            for data_type in chosen:
                collection = vector_collection(data_type)
                if not store.exists(collection):
                    continue
                embedder = EmbeddingDispatcher.embedder(data_type, settings)
                instruction = EmbeddingDispatcher.query_instruction(data_type, settings)
                vector = embedder.embed([query], query_instruction=instruction or "")[0]
                hits += store.search(collection, vector, args.limit, args.author)
            hits.sort(key=lambda h: -h.score)
            print_hits(query, hits[: args.limit], args.json)
            sys.stdout.flush()
    if not answered:
        err("no query: give QUERY or one query per line on stdin")
        return 2
    return 0


def print_hits(query: str, hits: list, as_json: bool) -> None:
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
