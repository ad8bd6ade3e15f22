"""The feature store (Qdrant): two snapshots per data type.

`cleaned_{type}` holds one point per document, no vector, payload = the cleaned document (for
fine-tuning datasets); `vector_{type}` one point per chunk with its embedding (for RAG), an
alias of one model's generation (`pipeline/generations.py`). Point ids are deterministic, so
every write is an idempotent upsert.

With `QDRANT_URL` unset, qdrant-client's local mode stores the collections under the data dir.
Local mode allows one process per folder: opening waits (bounded) for another process to let
go, and callers close the store as soon as their step ends. The one exception is a process that
keeps it open between uses (`KeptLocalStore`, the run server's): it publishes how to reach it,
and an opener that finds the folder held asks it to let go (`ask_holder_to_let_go`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdrant_client import QdrantClient, models

from llm_twin_features.stores.feature_store_state import (
    cleaned_collection,
    generation_collection,
    vector_collection,
)

__all__ = [
    "FeatureStore",
    "KeptLocalStore",
    "Point",
    "SparseVector",
    "cleaned_collection",
    "dense_vector",
    "generation_collection",
    "open_feature_store",
    "vector_collection",
]

SCROLL_PAGE = 1024
# The BM25 sparse vector's name, next to the unnamed dense vector (which stays the default,
# so plain dense queries such as the course retriever's work unchanged).
SPARSE_VECTOR = "bm25"
UPSERT_BATCH = 256
# Filtered keys: ours, and `owner_id`, the course retriever's author key for repositories.
KEYWORD_INDEXES = ("document_id", "author_id", "owner_id")


class FeatureStoreUnavailable(RuntimeError):
    """The feature store could not be opened or reached; nothing was written."""


def _author_filter(author_id: str | None) -> models.Filter | None:
    if not author_id:
        return None
    return models.Filter(
        must=[models.FieldCondition(key="author_id", match=models.MatchValue(value=author_id))]
    )


def _documents_filter(document_ids: Iterable[str] | None) -> models.Filter | None:
    if document_ids is None:
        return None
    return models.Filter(
        must=[
            models.FieldCondition(key="document_id", match=models.MatchAny(any=list(document_ids)))
        ]
    )


@dataclass(frozen=True)
class SparseVector:
    indices: list[int]
    values: list[float]


@dataclass(frozen=True)
class Point:
    id: str
    payload: dict[str, Any]
    vector: list[float] | None = None
    sparse: SparseVector | None = None


def dense_vector(vector: Any) -> list[float]:
    """The dense vector of a record (a collection with a sparse vector returns a dict)."""
    return vector[""] if isinstance(vector, dict) else vector


def _vectors(point: Point) -> Any:
    """A point's vectors as Qdrant takes them: none (the cleaned snapshot), the dense vector
    alone, or the dense one as the unnamed default next to the named sparse one."""
    if point.vector is None:
        return {}
    if point.sparse is None:
        return point.vector
    sparse = models.SparseVector(indices=point.sparse.indices, values=point.sparse.values)
    return {"": point.vector, SPARSE_VECTOR: sparse}


class FeatureStore:
    def __init__(self, client: QdrantClient, local: bool) -> None:
        self.client = client
        self.local = local
        self._tuned: set[str] = set()  # local collections whose SQLite file is in WAL mode

    # --- collections ---------------------------------------------------------------------------

    def exists(self, collection: str) -> bool:
        """Whether `collection` names a collection, or an alias of one."""
        return self.client.collection_exists(collection) or collection in self.aliases()

    def collections(self) -> list[str]:
        """The names of every collection (not the aliases)."""
        return sorted(c.name for c in self.client.get_collections().collections)

    def aliases(self) -> dict[str, str]:
        """alias -> the collection it names."""
        return {a.alias_name: a.collection_name for a in self.client.get_aliases().aliases}

    def point_alias(self, alias: str, collection: str) -> None:
        """Makes `alias` name `collection`, in one atomic change of the aliases: a reader sees
        the old collection or the new one, never none."""
        operations: list[models.AliasOperations] = []
        if alias in self.aliases():
            operations.append(
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))
            )
        operations.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)
            )
        )
        self.client.update_collection_aliases(change_aliases_operations=operations)

    def delete_collection(self, collection: str) -> None:
        self.client.delete_collection(collection)
        self._tuned.discard(collection)

    def _config(self, collection: str) -> models.CollectionConfig:
        """The configuration of `collection`, or of the collection an alias of that name
        names (resolved here: server mode's collection info is not read by alias)."""
        name = self.aliases().get(collection, collection)
        return self.client.get_collection(name).config

    def metadata(self, collection: str) -> dict[str, Any]:
        """What was stored with the collection when it was created (see `create_vector_...`)."""
        return dict(self._config(collection).metadata or {})

    def dimension(self, collection: str) -> int | None:
        vectors = self._config(collection).params.vectors
        return vectors.size if isinstance(vectors, models.VectorParams) else None

    def ensure_cleaned_collection(self, data_type: str) -> str:
        name = cleaned_collection(data_type)
        if not self.exists(name):
            self.client.create_collection(name, vectors_config={})
            self._index_payload(name)
        return name

    def ensure_vector_collection(
        self, name: str, dimension: int, metadata: dict[str, Any] | None = None
    ) -> str:
        """Creates the chunk collection `name` (dense, cosine, plus the BM25 sparse vector)
        with `metadata` when it does not exist yet."""
        if not self.exists(name):
            self._create_vector_collection(name, dimension, metadata)
        return name

    def _create_vector_collection(
        self, name: str, dimension: int, metadata: dict[str, Any] | None
    ) -> None:
        self.client.create_collection(
            name,
            vectors_config=models.VectorParams(size=dimension, distance=models.Distance.COSINE),
            sparse_vectors_config={
                SPARSE_VECTOR: models.SparseVectorParams(modifier=models.Modifier.IDF)
            },
            metadata=metadata,
        )
        self._index_payload(name)

    def has_sparse_vectors(self, collection: str) -> bool:
        if not self.exists(collection):
            return False
        return SPARSE_VECTOR in (self._config(collection).params.sparse_vectors or {})

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

    def document_ids(self, collection: str) -> set[str]:
        """The `document_id` of every point (payloads only, no vectors)."""
        if not self.exists(collection):
            return set()
        ids: set[str] = set()
        offset = None
        while True:
            records, offset = self.client.scroll(
                collection, limit=SCROLL_PAGE, offset=offset, with_payload=["document_id"]
            )
            ids.update(str((r.payload or {}).get("document_id", "")) for r in records)
            if offset is None:
                return ids - {""}

    def vectors(self, collection: str, point_ids: list[str]) -> dict[str, list[float]]:
        if not point_ids:
            return {}
        records = self.client.retrieve(collection, ids=point_ids, with_vectors=True)
        return {str(r.id): dense_vector(r.vector) for r in records}

    def count(self, collection: str) -> int:
        if not self.exists(collection):
            return 0
        return self.client.count(collection, exact=True).count

    def search(
        self, collection: str, vector: list[float], limit: int, author_id: str | None = None
    ) -> list[models.ScoredPoint]:
        """The nearest chunks by the dense (default) vector."""
        if not self.exists(collection):
            return []
        return self.client.query_points(
            collection,
            query=vector,
            limit=limit,
            query_filter=_author_filter(author_id),
            with_payload=True,
        ).points

    def sparse_search(
        self, collection: str, sparse: SparseVector, limit: int, author_id: str | None = None
    ) -> list[models.ScoredPoint]:
        """The best chunks by the BM25 sparse vector (Qdrant applies the IDF), each with its
        dense vector (as `dense_vector(point)` reads it). The collection must have sparse
        vectors (`has_sparse_vectors`: checked once per search session, not per query)."""
        if not sparse.indices or not self.exists(collection):
            return []
        return self.client.query_points(
            collection,
            query=models.SparseVector(indices=sparse.indices, values=sparse.values),
            using=SPARSE_VECTOR,
            limit=limit,
            query_filter=_author_filter(author_id),
            with_payload=True,
            with_vectors=[""],
        ).points

    # --- writes --------------------------------------------------------------------------------

    def upsert(self, collection: str, points: list[Point]) -> None:
        """Writes points (idempotent: their ids are deterministic); `vector` None: a payload
        only point (the cleaned snapshot)."""
        self._before_write(collection)
        structs = [
            models.PointStruct(id=p.id, vector=_vectors(p), payload=p.payload) for p in points
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

    def checkpoint(self) -> None:
        """Local mode: the points written since the last checkpoint moved from each SQLite
        write-ahead log into its database file, as closing does; the files are then what a
        closed store leaves (`state_token` reads them), though it stays open."""
        for collection in self._tuned:
            connection = local_storage(self.client, collection)
            if connection is not None:
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")


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
    shared: bool = False,
) -> FeatureStore:
    """A server client when `qdrant_url` is set, else local mode under `data_dir/qdrant`;
    `shared`: used by several threads in turn (SQLite refuses that by default where it is not
    built thread-safe, as on macOS)."""
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
            client = QdrantClient(path=str(path), force_disable_check_same_thread=shared)
            return FeatureStore(client, local=True)
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
            if ask_holder_to_let_go(data_dir):  # it has closed the store: open it now
                continue
            if on_wait and delay == 0.2:  # say it once
                on_wait(f"feature store {path} is in use by another process; waiting")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


# --- a local store kept open between uses ------------------------------------------------------

LET_GO = "let_go"  # the request a holder answers by closing its store


def holder_file(data_dir: Path) -> Path:
    """Where a process that keeps the local store open publishes how to ask it to let go."""
    return data_dir / "qdrant.holder.json"


class KeptLocalStore:
    """The local store of `data_dir`, kept open by one process between its steps and runs (the
    run server, `cli/run_server.py`): opening a Qdrant local folder loads every point of every
    collection, a cost that grows with the corpus. While it is kept, another process that wants
    the folder asks this one to let go (`ask_holder_to_let_go`): the store closes at once when
    no step uses it, else when the step ends, and opens again at this process's next use.
    Steps of different threads use it one at a time."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._store: FeatureStore | None = None
        self._lock = threading.Lock()
        self._wanted = False  # another process asked for the folder during a step

    @contextmanager
    def use(
        self, lock_timeout: float = 600.0, on_wait: Callable[[str], Any] | None = None
    ) -> Iterator[FeatureStore]:
        """The store, open, for one step."""
        with self._lock:
            if self._store is None:
                self._store = open_feature_store(
                    None, None, self.data_dir, lock_timeout, on_wait=on_wait, shared=True
                )
            try:
                yield self._store
            except BaseException:
                with contextlib.suppress(Exception):  # the step's error is the one to report
                    self._close()
                raise
            if self._wanted:  # asked during the step: the asker retries meanwhile
                self._wanted = False
                self._close()
            else:  # the files as a closed store leaves them, for `state_token`
                self._store.checkpoint()

    def let_go(self, timeout: float) -> bool:
        """Closes the store now, or when the step using it ends if that is within `timeout`
        seconds; whether this closed it (False: it was closed already, or still in use)."""
        self._wanted = True
        if not self._lock.acquire(timeout=timeout):
            return False
        try:
            return self._close()
        finally:
            self._wanted = False
            self._lock.release()

    def _close(self) -> bool:
        store, self._store = self._store, None
        if store is None:
            return False
        store.close()
        return True


_kept: dict[Path, KeptLocalStore] = {}


def keep_local_store(data_dir: Path) -> KeptLocalStore:
    """From now on, this process's steps share one open local store of `data_dir`."""
    return _kept.setdefault(data_dir.resolve(), KeptLocalStore(data_dir))


def kept_local_store(data_dir: Path) -> KeptLocalStore | None:
    """The store this process keeps open for `data_dir`, if it keeps one."""
    return _kept.get(data_dir.resolve()) if _kept else None


def ask_holder_to_let_go(data_dir: Path, timeout: float = 5.0) -> bool:
    """Asks the process that published itself as keeping the local store of `data_dir` open
    (`holder_file`) to close it; True once it has. False when none is published, its process
    is gone, or it did not answer in `timeout` seconds (it is then in a step: the caller
    waits for the folder as for any other process)."""
    try:
        holder = json.loads(holder_file(data_dir).read_text())
        if holder["pid"] == os.getpid():
            return False
        with socket.create_connection(("127.0.0.1", int(holder["port"])), timeout=timeout) as s:
            request = {"token": holder["token"], "request": LET_GO, "timeout": timeout}
            s.sendall(json.dumps(request).encode() + b"\n")
            reply = s.makefile("r").readline()
        return bool(json.loads(reply).get("closed"))
    except (OSError, ValueError, KeyError, TypeError):
        return False
