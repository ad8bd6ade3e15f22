"""Hybrid retrieval on a real Qdrant local store: dense and BM25 results fused by rank, the
dense default vector still answering plain queries (the course retriever's), collections
from before sparse vectors and generations adopted with their dense vectors kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_twin_features.domain.sparse import document_vector
from llm_twin_features.pipeline import generations, retrieval
from llm_twin_features.stores.feature_store import (
    FeatureStore,
    Point,
    SparseVector,
    dense_vector,
    generation_collection,
    open_feature_store,
    vector_collection,
)

TEXTS = {
    "a": "Dagster assets describe data, and partitions split them by data type.",
    "b": "The quokka_rebalance() helper moves shards between RabbitMQ consumers.",
    "c": "Vector databases store embeddings for nearest neighbour search.",
}


def unit(*weights: float) -> list[float]:
    norm = sum(w * w for w in weights) ** 0.5
    return [w / norm for w in weights]


# Dense vectors that rank "c" first for every query, "b" last: the dense model "misses" b.
DENSE = {"a": unit(0.6, 0.8, 0.0), "b": unit(0.0, 0.2, 1.0), "c": unit(0.8, 0.6, 0.0)}
QUERY = unit(1.0, 0.5, 0.0)


@pytest.fixture
def store(tmp_path: Path):
    store = open_feature_store(None, None, tmp_path)
    store.ensure_vector_collection(vector_collection("posts"), 3)
    store.upsert(
        vector_collection("posts"),
        [
            Point(
                f"00000000-0000-0000-0000-00000000000{i}",
                {"document_id": key},
                DENSE[key],
                SparseVector(*document_vector(text)),
            )
            for i, (key, text) in enumerate(TEXTS.items())
        ],
    )
    yield store
    store.close()


def documents(hits: list[retrieval.Hit]) -> list[str]:
    return [hit.payload["document_id"] for hit in hits]


def test_hybrid_finds_what_only_the_keywords_match(store: FeatureStore):
    query = "quokka_rebalance"
    dense = retrieval.search(store, query, {"posts": QUERY}, 1, mode="dense")
    hybrid = retrieval.search(store, query, {"posts": QUERY}, 1, mode="hybrid")
    assert documents(dense) == ["c"]
    assert documents(hybrid) == ["b"]
    assert hybrid[0].dense_score is not None  # found by both searches (b is in dense's 3)


def test_rank_fusion_ties_are_broken_by_the_dense_score(store: FeatureStore):
    hits = retrieval.search(store, "no keyword matches here", {"posts": QUERY}, 3, "hybrid")
    assert documents(hits) == ["c", "a", "b"]  # the sparse search found nothing: dense order


def test_plain_dense_queries_use_the_default_vector(store: FeatureStore):
    """The course retriever queries `vector_*` with a bare vector and reads `content`-style
    payloads: the dense vector must stay the collection's default (unnamed) vector."""
    points = store.client.query_points(vector_collection("posts"), query=QUERY, limit=1).points
    assert points[0].payload == {"document_id": "c"}
    assert store.has_sparse_vectors(vector_collection("posts"))


def test_a_collection_from_before_generations_is_adopted_keeping_its_vectors(tmp_path: Path):
    """A `vector_posts` collection from before sparse vectors and generations becomes the
    generation of its model, with sparse vectors, and `vector_posts` its alias."""
    store = open_feature_store(None, None, tmp_path)
    from qdrant_client import models

    name = vector_collection("posts")
    store.client.create_collection(
        name, vectors_config=models.VectorParams(size=3, distance=models.Distance.COSINE)
    )
    payload = {"document_id": "a", "model_id": "old-model"}
    store.upsert(name, [Point("00000000-0000-0000-0000-000000000001", payload, DENSE["a"])])
    assert not store.has_sparse_vectors(name)
    assert retrieval.effective_mode(store, ["posts"], "hybrid") == "dense"

    adopted = generations.adopt_legacy(store, "posts")
    assert adopted == generation_collection("posts", "old-model")
    assert store.aliases() == {name: adopted}
    assert store.has_sparse_vectors(name)
    assert store.metadata(name)["model_id"] == "old-model"
    (kept,) = store.points(name, with_vectors=True)
    assert kept.payload == payload
    # The dense vector alone (the sparse one is written by the next backfill's embed stage).
    assert dense_vector(kept.vector) == pytest.approx(DENSE["a"], abs=1e-6)
    assert generations.adopt_legacy(store, "posts") is None
    store.close()
