"""Blue-green generations of the chunk vectors: one collection per model, an alias for search.

`vector_{type}` is a Qdrant alias of the *serving* generation, the collection
`vector_{type}__{hash of the model signature}` that search and the course retriever read.
The configured model writes its own generation, the *target*. They are the same collection
except after a model change; then:

- runs build the target beside the serving one (backfills, shards, repair runs of the audit,
  change events: every run writes the target with the new model);
- search keeps reading the serving generation with the model that built it (recorded in the
  collection's metadata), so no query mixes two models' vectors or meets a new dimension;
- a document deleted (or now invalid) leaves the serving generation too; an edited or new
  document reaches search when the target takes over, as all its changes are in the target;
- once the audit of the whole target is clean, the alias switches to it in one atomic step;
- the old generation stays, unread, until `llm-twin-features generations --prune` removes it
  (switching back to its model reuses every vector it still has right).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from llm_twin_features.domain.embedding import Embedder
from llm_twin_features.stores.feature_store import (
    SPARSE_VECTOR,
    FeatureStore,
    Point,
    SparseVector,
    dense_vector,
)
from llm_twin_features.stores.feature_store_state import (
    generation_collection,
    is_generation_of,
    vector_collection,
)

# Points copied per batch when a collection from before generations is adopted.
ADOPT_BATCH = 1024


@dataclass(frozen=True)
class Generation:
    """One model's collection of a data type, as its metadata describes it."""

    collection: str
    model_signature: str
    model_id: str
    query_instruction: str
    points: int
    role: str  # "serving", "building" (the configured model's, not serving yet) or "retired"


def metadata(embedder: Embedder, query_instruction: str | None) -> dict[str, Any]:
    """What a generation records about its model: what search needs to embed queries for it."""
    return _recorded(embedder.signature, embedder.model_id, query_instruction or "")


def _recorded(signature: str, model_id: str, query_instruction: str, **more: str) -> dict:
    return {
        "model_signature": signature,
        "model_id": model_id,
        "query_instruction": query_instruction,
        "created_at": datetime.now(UTC).isoformat(),
        **more,
    }


def serving(store: FeatureStore, data_type: str) -> str | None:
    """The collection search reads for `data_type` (None: none yet)."""
    alias = vector_collection(data_type)
    target = store.aliases().get(alias)
    if target is not None:
        return target
    return alias if store.exists(alias) else None  # a collection from before generations


def serving_model(
    store: FeatureStore, data_type: str, configured_signature: str
) -> tuple[str, str] | None:
    """The model id and query instruction that queries of the serving generation need, when
    another model than the configured one built it (None: the configured model's)."""
    collection = serving(store, data_type)
    if collection is None:
        return None
    recorded = store.metadata(collection)
    signature = recorded.get("model_signature")
    if not signature or signature == configured_signature or not recorded.get("model_id"):
        return None  # the configured model's, or one nobody recorded
    return str(recorded["model_id"]), str(recorded.get("query_instruction", ""))


def written(store: FeatureStore, data_type: str, model_signature: str) -> str:
    """The collection the model writes: its generation, or (until a run adopts it) a
    collection from before generations."""
    target = generation_collection(data_type, model_signature)
    if store.exists(target):
        return target
    alias = vector_collection(data_type)
    legacy = store.exists(alias) and alias not in store.aliases()
    return alias if legacy else target


def all_of(store: FeatureStore, data_type: str) -> list[str]:
    """Every generation of `data_type` (and a collection from before them)."""
    alias = vector_collection(data_type)
    return [c for c in store.collections() if c == alias or is_generation_of(c, data_type)]


def adopt_legacy(store: FeatureStore, data_type: str) -> str | None:
    """A `vector_{type}` collection written before generations becomes the generation of the
    model that built it (its points' `model_id`; the original pipeline's points have none),
    with every point and vector copied, and `vector_{type}` its alias. Returns that
    generation (None: nothing to adopt). Qdrant cannot turn a collection into an alias, so a
    server-mode reader finds no `vector_{type}` between the delete and the alias: once, at
    the first run after the upgrade."""
    alias = vector_collection(data_type)
    if alias in store.aliases() or not store.client.collection_exists(alias):
        return None
    dimension = store.dimension(alias)
    if dimension is None:
        raise ValueError(f"{alias} has no single dense vector; cannot adopt it")
    first = next(store.points(alias), None)
    # Points without `model_id` (the original pipeline's) come from a model we cannot name:
    # their generation serves until the configured model's is complete, queried with it.
    recorded_model = str((first.payload or {}).get("model_id") or "") if first else ""
    signature = recorded_model or f"unrecorded-model-{dimension}d"
    target = generation_collection(data_type, signature)
    model_id = recorded_model.split("#", 1)[0]  # an instruction is `#instruction=...`
    recorded = _recorded(signature, model_id, "", adopted_from=alias)
    store.delete_collection(target)  # a copy cut short before
    store.ensure_vector_collection(target, dimension, recorded)
    batch: list[Point] = []
    for record in store.points(alias, with_vectors=True):
        vectors: dict[str, Any] = (
            record.vector if isinstance(record.vector, dict) else {"": record.vector}
        )
        sparse = vectors.get(SPARSE_VECTOR)
        batch.append(
            Point(
                str(record.id),
                record.payload or {},
                dense_vector(vectors),
                SparseVector(list(sparse.indices), list(sparse.values)) if sparse else None,
            )
        )
        if len(batch) >= ADOPT_BATCH:
            store.upsert(target, batch)
            batch = []
    store.upsert(target, batch)
    store.delete_collection(alias)
    store.point_alias(alias, target)
    return target


def publish_first(store: FeatureStore, data_type: str, target: str) -> bool:
    """Points `vector_{type}` at `target` when no generation serves yet (nothing to protect)."""
    if serving(store, data_type) is not None or not store.exists(target):
        return False
    store.point_alias(vector_collection(data_type), target)
    return True


def switch(store: FeatureStore, data_type: str, target: str) -> str | None:
    """Makes `target` the serving generation, atomically; returns the one it replaces."""
    previous = serving(store, data_type)
    store.point_alias(vector_collection(data_type), target)
    return previous


def generations(store: FeatureStore, data_type: str, configured_signature: str) -> list[Generation]:
    """Every generation of `data_type`, serving first, with its model and role."""
    serving_now = serving(store, data_type)
    target = written(store, data_type, configured_signature)
    found = []
    for collection in all_of(store, data_type):
        recorded = store.metadata(collection)
        if collection == serving_now:
            role = "serving"
        elif collection == target:
            role = "building"
        else:
            role = "retired"
        found.append(
            Generation(
                collection,
                str(recorded.get("model_signature", "")),
                str(recorded.get("model_id", "")),
                str(recorded.get("query_instruction", "")),
                store.count(collection),
                role,
            )
        )
    found.sort(key=lambda g: ("serving", "building", "retired").index(g.role))
    return found


def prune(store: FeatureStore, data_type: str, configured_signature: str) -> list[str]:
    """Removes the retired generations (neither serving nor the configured model's)."""
    retired = [
        g.collection
        for g in generations(store, data_type, configured_signature)
        if g.role == "retired"
    ]
    for collection in retired:
        store.delete_collection(collection)
    return retired
