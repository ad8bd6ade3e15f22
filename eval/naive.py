"""The naive baseline of issue 14: the original pipeline's chunking, no cleaning, MiniLM,
brute-force cosine.

- text: the content values joined with a paragraph break (the original joined with no
  separator, gluing the last word of one value to the first of the next; a blank line is the
  charitable reading); repositories' file paths are not part of the text (the original
  joined `content.values()`); no cleaning at all;
- chunks: LangChain `RecursiveCharacterTextSplitter(separators=["\\n\\n"], chunk_size=500,
  chunk_overlap=0)`, then every piece through `SentenceTransformersTokenTextSplitter(
  chunk_overlap=50, tokens_per_chunk=256, model_name=<bundled all-MiniLM-L6-v2 path>)`
  (which returns decoded, lower-cased token text, as the original stored);
- vectors: all-MiniLM-L6-v2 (the bundled copy), every type, no instruction, normalised;
- search: the query embedded plainly; top 5 chunks over all types by cosine.
"""

from __future__ import annotations

import time

from common import CachedEmbedder, bundled_model_path, dense_rank, first_rank, metrics


def naive_text(doc: dict) -> str:
    return "\n\n".join(v for v in doc["content"].values() if isinstance(v, str) and v.strip())


def naive_chunks(docs: list[dict]) -> tuple[list[str], list[str]]:
    from langchain_text_splitters import (
        RecursiveCharacterTextSplitter,
        SentenceTransformersTokenTextSplitter,
    )

    chars = RecursiveCharacterTextSplitter(separators=["\n\n"], chunk_size=500, chunk_overlap=0)
    tokens = SentenceTransformersTokenTextSplitter(
        chunk_overlap=50, tokens_per_chunk=256, model_name=bundled_model_path()
    )
    texts, doc_ids = [], []
    for doc in docs:
        for piece in chars.split_text(naive_text(doc)):
            for chunk in tokens.split_text(piece):
                if chunk.strip():
                    texts.append(chunk)
                    doc_ids.append(doc["_id"])
    return texts, doc_ids


def evaluate(docs: list[dict], qs: list[dict]) -> dict:
    started = time.perf_counter()
    texts, doc_ids = naive_chunks(docs)
    embedder = CachedEmbedder()
    chunk_vectors = embedder.embed(texts)
    built = time.perf_counter() - started
    started = time.perf_counter()
    query_vectors = embedder.embed([q["query"] for q in qs])
    ranked = dense_rank(query_vectors, chunk_vectors, doc_ids)
    searched = time.perf_counter() - started
    ranks = [first_rank(r, q["document_id"]) for r, q in zip(ranked, qs, strict=True)]
    return {
        "metrics": metrics(qs, ranks),
        "chunks": len(texts),
        "build_seconds": round(built, 1),
        "search_seconds_per_query": searched / len(qs),
        "ranks": ranks,
    }
