"""The document warehouse and the pipeline's own durable stage state, behind one adapter.

`mongodb://` / `mongodb+srv://` URIs use pymongo; no URI selects the embedded warehouse: a
montydb folder (sqlite storage) under the data dir, multi-process safe. Both kinds of
collection offer the same few operations, so the pipeline has one code path. Stage state
(validated raw documents, chunks, quarantine) lives in a second database next to the
warehouse.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_twin_features.domain.data_types import spec_of
from llm_twin_features.domain.validation import UnreadableDocument

QUARANTINE = "quarantine"
SYNC_MARKS = "sync_marks"


class WarehouseUnavailable(RuntimeError):
    """The warehouse could not be reached; nothing was written."""


class WarehouseError(RuntimeError):
    """A warehouse operation failed (disk full, unreadable file, ...); the batch was not
    written. The message names the store, where it is and what to do."""


def _montydb_client(path: Path):
    from montydb import MontyClient, set_storage

    path.mkdir(parents=True, exist_ok=True)
    if not (path / "monty.storage.cfg").exists():
        set_storage(repository=str(path), storage="sqlite", use_bson=False)
    return MontyClient(str(path))


def _mongo_client(uri: str):
    import pymongo

    return pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000, tz_aware=True)


def _project(document: dict, fields: list[str] | None) -> dict:
    if fields is None:
        return document
    return {k: v for k, v in document.items() if k == "_id" or k in fields}


class MongoCollection:
    """A pymongo collection: MongoDB writes each document atomically, `bulk_write` batches."""

    def __init__(self, collection: Any) -> None:
        self._collection = collection

    def find(
        self, ids: Iterable[str] | None = None, fields: list[str] | None = None
    ) -> Iterator[dict]:
        query = {} if ids is None else {"_id": {"$in": list(ids)}}
        projection = None if fields is None else dict.fromkeys(fields, 1)
        return iter(self._collection.find(query, projection))

    def get(self, document_id: str) -> dict | None:
        return self._collection.find_one({"_id": document_id})

    def ids(self) -> set[str]:
        return {str(doc["_id"]) for doc in self._collection.find({}, {"_id": 1})}

    def count(self) -> int:
        return self._collection.count_documents({})

    def digest(self) -> str:
        """A digest of every document as stored (BSON bytes, in id order): equal digests,
        equal collections. One pass over the collection, no decoding."""
        from bson.raw_bson import RawBSONDocument
        from pymongo import ASCENDING

        raw = self._collection.with_options(
            codec_options=self._collection.codec_options.with_options(
                document_class=RawBSONDocument
            )
        )
        digest = hashlib.blake2b(digest_size=16)
        for document in raw.find({}).sort("_id", ASCENDING):
            digest.update(len(document.raw).to_bytes(8, "big"))
            digest.update(document.raw)
        return digest.hexdigest()

    def replace_many(self, documents: list[dict]) -> None:
        documents = list({d["_id"]: d for d in documents}.values())  # last write of an id wins
        if not documents:
            return
        from pymongo import ReplaceOne

        self._collection.bulk_write(
            [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in documents], ordered=False
        )

    def delete_many(self, ids: Iterable[str]) -> int:
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        return self._collection.delete_many({"_id": {"$in": wanted}}).deleted_count


class EmbeddedCollection:
    """A collection of the embedded warehouse: one SQLite file per collection, in montydb's
    sqlite storage format (table `documents`, key = JSON of the id, value = JSON of the
    document), so a montydb client still opens the folder.

    Reads and writes go to SQLite directly rather than through montydb, because montydb
    (a) replaced documents as delete-commit-insert, so a kill in between lost them, and two
    writers of one id raised `UNIQUE constraint failed`; (b) decoded Extended JSON on read,
    so a document holding `{"$date": "yesterday"}` made the whole collection unreadable.
    Here every batch is one transaction (an upsert per row: all or nothing, last writer
    wins), values are read back as the JSON that was written, and a row that cannot be
    decoded comes back as an `UnreadableDocument` (or is skipped, for derived state that
    its stage rebuilds) instead of failing its neighbours.
    """

    TIMEOUT_SECONDS = 60.0  # how long a writer waits for another writer's transaction
    SQL_VARIABLES = 500  # ids per `IN (...)` query

    def __init__(self, path: Path, keep_unreadable: bool) -> None:
        self._path = path
        self._keep_unreadable = keep_unreadable

    @contextmanager
    def _connection(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        try:
            if not write and not self._path.exists():
                yield sqlite3.connect(":memory:")  # an empty collection, created on first write
                return
            self._path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(
                self._path, timeout=self.TIMEOUT_SECONDS, isolation_level=None
            )
            try:
                if write:
                    self._write_ahead_log(connection)
                    connection.execute(
                        "CREATE TABLE IF NOT EXISTS documents"
                        "(k text NOT NULL, v text NOT NULL, PRIMARY KEY(k))"
                    )
                    connection.execute("BEGIN IMMEDIATE")
                    yield connection
                    connection.execute("COMMIT")
                else:
                    yield connection
            finally:
                connection.close()  # an open transaction is rolled back: nothing half-written
        except sqlite3.Error as error:
            raise WarehouseError(
                f"embedded warehouse at {self._path}: {error}"
                + (
                    "; free some disk space and run the command again"
                    if "full" in str(error) or "I/O" in str(error)
                    else "; check that the file is readable and not damaged"
                )
            ) from error

    def _write_ahead_log(self, connection: sqlite3.Connection) -> None:
        """Puts the file in WAL mode (readers never wait for a writer). SQLite does not wait
        for another connection's lock on this statement (no busy timeout): two writers of a
        new file at once got `database is locked` at once, so it is retried here."""
        deadline = time.monotonic() + self.TIMEOUT_SECONDS
        while True:
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _rows(self, ids: Iterable[str] | None) -> Iterator[tuple[Any, Any]]:
        with self._connection() as connection:
            if not self._table_exists(connection):
                return
            if ids is None:
                yield from connection.execute("SELECT k, v FROM documents")
                return
            keys = [_encode_key(i) for i in dict.fromkeys(ids)]
            for start in range(0, len(keys), self.SQL_VARIABLES):
                batch = keys[start : start + self.SQL_VARIABLES]
                marks = ",".join("?" * len(batch))
                yield from connection.execute(
                    f"SELECT k, v FROM documents WHERE k IN ({marks})", batch
                )

    @staticmethod
    def _table_exists(connection: sqlite3.Connection) -> bool:
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'documents'"
        return connection.execute(query).fetchone() is not None

    def find(
        self, ids: Iterable[str] | None = None, fields: list[str] | None = None
    ) -> Iterator[dict]:
        for key, value in self._rows(ids):
            try:
                document = json.loads(value)
                if not isinstance(document, dict):
                    raise ValueError(f"a {type(document).__name__}, not a document")
            except (ValueError, RecursionError) as error:
                if self._keep_unreadable:
                    reason = f"stored document cannot be decoded: {str(error)[:200]}"
                    yield UnreadableDocument(_decode_key(key), reason)
                continue
            document["_id"] = _decode_key(key)
            yield _project(document, fields)

    def get(self, document_id: str) -> dict | None:
        return next(self.find([document_id]), None)

    def ids(self) -> set[str]:
        with self._connection() as connection:
            if not self._table_exists(connection):
                return set()
            return {_decode_key(k) for (k,) in connection.execute("SELECT k FROM documents")}

    def count(self) -> int:
        with self._connection() as connection:
            if not self._table_exists(connection):
                return 0
            return connection.execute("SELECT count(*) FROM documents").fetchone()[0]

    def digest(self) -> str:
        """A digest of every row as stored (key and JSON text, in key order): equal digests,
        equal collections. One pass over the file, no JSON decoding."""
        digest = hashlib.blake2b(digest_size=16)
        with self._connection() as connection:
            if self._table_exists(connection):
                for key, value in connection.execute("SELECT k, v FROM documents ORDER BY k"):
                    for part in (key, value):
                        data = part if isinstance(part, bytes) else str(part).encode()
                        digest.update(len(data).to_bytes(8, "big"))
                        digest.update(data)
        return digest.hexdigest()

    def replace_many(self, documents: list[dict]) -> None:
        rows = {}
        for document in documents:  # encoded before the transaction: a bad one writes nothing
            body = {k: v for k, v in document.items() if k != "_id"}
            rows[_encode_key(document["_id"])] = json.dumps(
                {"_id": document["_id"], **body}
            ).encode()
        if not rows:
            return
        with self._connection(write=True) as connection:
            connection.executemany(
                "INSERT INTO documents(k, v) VALUES (?, ?) "
                "ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                rows.items(),
            )

    def delete_many(self, ids: Iterable[str]) -> int:
        keys = [(_encode_key(i),) for i in set(ids)]
        if not keys or not self._path.exists():
            return 0
        with self._connection(write=True) as connection:
            before = connection.total_changes
            connection.executemany("DELETE FROM documents WHERE k = ?", keys)
            return connection.total_changes - before


def _encode_key(document_id: Any) -> bytes:
    """montydb's key encoding (without bson): the id as JSON, as bytes."""
    return json.dumps(document_id).encode()


def _decode_key(key: Any) -> str:
    """The id a key stands for, as a string (montydb writes ObjectIds as `{"$oid": hex}`)."""
    text = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, dict) and isinstance(value.get("$oid"), str):
        return value["$oid"]
    return value if isinstance(value, str) else text


Collection = MongoCollection | EmbeddedCollection


@dataclass
class Warehouse:
    """Warehouse collections (one per data type) and the stage state next to them.

    `client` is the pymongo client in server mode, and a montydb client on the embedded
    folder otherwise (kept for tools that speak pymongo's API; the collections here read and
    write the folder's SQLite files themselves). `root` is that folder (None in server mode).
    """

    client: Any
    database: str
    features_database: str
    embedded: bool
    root: Path | None = None

    def _collection(self, database: str, name: str, keep_unreadable: bool) -> Collection:
        if self.root is not None:
            return EmbeddedCollection(self.root / database / f"{name}.collection", keep_unreadable)
        return MongoCollection(self.client[database][name])

    def documents(self, data_type: str) -> Collection:
        """The user's documents: a row that cannot be read comes back as UnreadableDocument."""
        self._check_type(data_type)
        return self._collection(self.database, data_type, keep_unreadable=True)

    def raw_state(self, data_type: str) -> Collection:
        self._check_type(data_type)
        return self._collection(self.features_database, f"raw_{data_type}", False)

    def chunk_state(self, data_type: str) -> Collection:
        self._check_type(data_type)
        return self._collection(self.features_database, f"chunks_{data_type}", False)

    def quarantine(self) -> Collection:
        return self._collection(self.features_database, QUARANTINE, False)

    def sync_marks(self) -> Collection:
        """One record per data type: what its last complete whole-partition sync saw."""
        return self._collection(self.features_database, SYNC_MARKS, False)

    def quarantined(self, data_type: str) -> list[dict]:
        return [q for q in self.quarantine().find() if q.get("data_type") == data_type]

    def ping(self) -> None:
        if self.embedded:
            return
        try:
            self.client.admin.command("ping")
        except Exception as error:
            raise WarehouseUnavailable(f"warehouse unreachable: {error}") from error

    def close(self) -> None:
        self.client.close()

    @staticmethod
    def _check_type(data_type: str) -> None:
        spec_of(data_type)  # raises ValueError for an unknown type


def open_warehouse(
    mongo_uri: str | None, database: str, features_database: str, data_dir: Path
) -> Warehouse:
    if mongo_uri:
        if not mongo_uri.startswith(("mongodb://", "mongodb+srv://")):
            raise ValueError("MONGO_URI must start with mongodb:// or mongodb+srv://")
        return Warehouse(_mongo_client(mongo_uri), database, features_database, embedded=False)
    root = data_dir / "warehouse"
    try:
        client = _montydb_client(root)
    except OSError as error:
        raise WarehouseError(
            f"embedded warehouse at {root}: {error}; check the path (LLM_TWIN_DATA_DIR), its "
            "permissions and free disk space"
        ) from error
    return Warehouse(client, database, features_database, embedded=True, root=root)
