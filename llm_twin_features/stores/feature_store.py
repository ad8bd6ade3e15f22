"""The feature store (Qdrant): two snapshots per data type.

`cleaned_{type}` holds one point per document, no vector, payload = the cleaned document (for
fine-tuning datasets); `vector_{type}` one point per chunk with its embedding (for RAG). Point
ids are deterministic, so every write is an idempotent upsert.

With `QDRANT_URL` unset, qdrant-client's local mode stores the collections under the data dir.
Local mode allows one process per folder: opening waits (bounded) for another process to let
go, and callers close the store as soon as their step ends.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdrant_client import QdrantClient, models

from llm_twin_features.stores.feature_store_state import cleaned_collection, vector_collection

__all__ = ["FeatureStore", "Point", "cleaned_collection", "open_feature_store", "vector_collection"]

SCROLL_PAGE = 1024
UPSERT_BATCH = 256
# Filtered keys: ours, and `owner_id`, the course retriever's author key for repositories.
KEYWORD_INDEXES = ("document_id", "author_id", "owner_id")


class FeatureStoreUnavailable(RuntimeError):
    """The feature store could not be opened or reached; nothing was written."""


def _documents_filter(document_ids: Iterable[str] | None) -> models.Filter | None:
    if document_ids is None:
        return None
    return models.Filter(
        must=[
            models.FieldCondition(key="document_id", match=models.MatchAny(any=list(document_ids)))
        ]
    )


@dataclass(frozen=True)
class Point:
    id: str
    payload: dict[str, Any]
    vector: list[float] | None = None


class FeatureStore:
    def __init__(self, client: QdrantClient, local: bool) -> None:
        self.client = client
        self.local = local
        self._tuned: set[str] = set()  # local collections whose SQLite file is in WAL mode

    # --- collections ---------------------------------------------------------------------------

    def exists(self, collection: str) -> bool:
        return self.client.collection_exists(collection)

    def ensure_cleaned_collection(self, data_type: str) -> str:
        name = cleaned_collection(data_type)
        if not self.exists(name):
            self.client.create_collection(name, vectors_config={})
            self._index_payload(name)
        return name

    def ensure_vector_collection(self, data_type: str, dimension: int) -> str:
        """Creates `vector_{type}`; recreates it when the model's dimension changed."""
        name = vector_collection(data_type)
        if self.exists(name):
            params = self.client.get_collection(name).config.params.vectors
            if isinstance(params, models.VectorParams) and params.size == dimension:
                return name
            self.client.delete_collection(name)
        self.client.create_collection(
            name,
            vectors_config=models.VectorParams(size=dimension, distance=models.Distance.COSINE),
        )
        self._index_payload(name)
        return name

    def _index_payload(self, name: str) -> None:
        if self.local:  # local mode scans payloads; indexes have no effect there
            return
        for field in KEYWORD_INDEXES:
            self.client.create_payload_index(name, field, models.PayloadSchemaType.KEYWORD)

    # --- reads ---------------------------------------------------------------------------------

    def points(
        self,
        collection: str,
        document_ids: Iterable[str] | None = None,
        with_vectors: bool = False,
    ) -> Iterator[models.Record]:
        """Every point of `collection`, or of the given documents only."""
        if not self.exists(collection):
            return
        query_filter = _documents_filter(document_ids)
        offset = None
        while True:
            records, offset = self.client.scroll(
                collection,
                scroll_filter=query_filter,
                limit=SCROLL_PAGE,
                offset=offset,
                with_payload=True,
                with_vectors=with_vectors,
            )
            yield from records
            if offset is None:
                return

    def vectors(self, collection: str, point_ids: list[str]) -> dict[str, list[float]]:
        if not point_ids:
            return {}
        records = self.client.retrieve(collection, ids=point_ids, with_vectors=True)
        return {str(r.id): r.vector for r in records}  # type: ignore[misc]

    def count(self, collection: str) -> int:
        if not self.exists(collection):
            return 0
        return self.client.count(collection, exact=True).count

    def search(
        self, collection: str, vector: list[float], limit: int, author_id: str | None = None
    ) -> list[models.ScoredPoint]:
        if not self.exists(collection):
            return []
        query_filter = None
        if author_id:
            query_filter = models.Filter(
                must=[
                    models.FieldCondition(key="author_id", match=models.MatchValue(value=author_id))
                ]
            )
        return self.client.query_points(
            collection, query=vector, limit=limit, query_filter=query_filter, with_payload=True
        ).points

    # --- writes --------------------------------------------------------------------------------

    def upsert(self, collection: str, points: list[Point]) -> None:
        """Writes points (idempotent: their ids are deterministic); `vector` None: a payload
        only point (the cleaned snapshot)."""
        self._before_write(collection)
        structs = [
            models.PointStruct(id=p.id, vector=p.vector or {}, payload=p.payload) for p in points
        ]
        for start in range(0, len(structs), UPSERT_BATCH):
            self.client.upsert(collection, points=structs[start : start + UPSERT_BATCH], wait=True)

    def delete_points(self, collection: str, point_ids: Iterable[str]) -> None:
        ids: list[models.ExtendedPointId] = list(point_ids)
        if ids and self.exists(collection):
            self._before_write(collection)
            self.client.delete(
                collection, points_selector=models.PointIdsList(points=ids), wait=True
            )

    def _before_write(self, collection: str) -> None:
        if self.local and collection not in self._tuned:
            self._tuned.add(collection)
            _write_ahead_log(self.client, collection)

    def close(self) -> None:
        self.client.close()


def local_storage(client: QdrantClient, collection: str) -> sqlite3.Connection | None:
    """The SQLite connection a local-mode collection persists its points through (None when
    qdrant-client's internals differ from what this expects)."""
    collections = getattr(getattr(client, "_client", None), "collections", {})
    storage = getattr(collections.get(collection), "storage", None)
    connection = getattr(storage, "storage", None)
    return connection if isinstance(connection, sqlite3.Connection) else None


def _write_ahead_log(client: QdrantClient, collection: str) -> None:
    """Local mode commits every point on its own, and each commit waits for the disk (about
    1 ms a point here, most of a write). In WAL mode with synchronous=NORMAL, SQLite's
    recommended setting for WAL, a commit survives a crash of the process without waiting
    for the disk (the last commits can be lost if the machine itself fails; the audit
    repairs that from the warehouse): writes run about 5x faster."""
    connection = local_storage(client, collection)
    if connection is not None:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")


def open_feature_store(
    qdrant_url: str | None,
    api_key: str | None,
    data_dir: Path,
    lock_timeout: float = 600.0,
    on_wait: Callable[[str], Any] | None = None,
) -> FeatureStore:
    """A server client when `qdrant_url` is set, else local mode under `data_dir/qdrant`."""
    if qdrant_url:
        client = QdrantClient(url=qdrant_url, api_key=api_key, timeout=30)
        try:
            client.get_collections()
        except Exception as error:
            raise FeatureStoreUnavailable(f"Qdrant at {qdrant_url} unreachable: {error}") from error
        return FeatureStore(client, local=False)

    path = data_dir / "qdrant"
    deadline = time.monotonic() + lock_timeout
    delay = 0.2
    while True:
        try:
            path.mkdir(parents=True, exist_ok=True)
            return FeatureStore(QdrantClient(path=str(path)), local=True)
        except (sqlite3.Error, OSError) as error:
            raise FeatureStoreUnavailable(
                f"the local feature store at {path} cannot be opened: {error}; free some disk "
                "space and check that the folder is writable, then run the command again"
            ) from error
        except RuntimeError as error:
            if "already accessed" not in str(error):
                raise
            if time.monotonic() >= deadline:
                raise FeatureStoreUnavailable(
                    f"the local feature store at {path} is held by another process for more than "
                    f"{lock_timeout:.0f} s (a running pipeline run, `dagster dev` step or CLI); "
                    "retry when it is done, or set QDRANT_URL to use a Qdrant server"
                ) from error
            if on_wait and delay == 0.2:  # say it once
                on_wait(f"feature store {path} is in use by another process; waiting")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
