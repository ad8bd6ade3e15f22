"""The document warehouse and the pipeline's own durable stage state, behind one adapter.

`mongodb://` / `mongodb+srv://` URIs use pymongo; no URI selects montydb with sqlite storage
under the data dir (embedded, multi-process safe). Both expose the pymongo collection API this
module uses, so embedded and server modes share one code path. Stage state (validated raw
documents, chunks, quarantine) lives in a second database next to the warehouse.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_twin_features.settings import DATA_TYPES

QUARANTINE = "quarantine"


class WarehouseUnavailable(RuntimeError):
    """The warehouse could not be reached; nothing was written."""


def _montydb_client(path: Path):
    from montydb import MontyClient, set_storage

    path.mkdir(parents=True, exist_ok=True)
    if not (path / "monty.storage.cfg").exists():
        set_storage(repository=str(path), storage="sqlite", use_bson=False)
    return MontyClient(str(path))


def _mongo_client(uri: str):
    import pymongo

    return pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000, tz_aware=True)


class Collection:
    """The few collection operations the pipeline needs, fast on both backends.

    montydb commits every single-document write (about 14 ms each), so writes are batched:
    pymongo gets `bulk_write`, montydb a delete of the ids present followed by `insert_many`.
    """

    def __init__(self, collection: Any, embedded: bool) -> None:
        self._collection = collection
        self._embedded = embedded

    @property
    def name(self) -> str:
        return self._collection.name

    def find(
        self, ids: Iterable[str] | None = None, fields: list[str] | None = None
    ) -> Iterator[dict]:
        query = {} if ids is None else {"_id": {"$in": list(ids)}}
        projection = None if fields is None else dict.fromkeys(fields, 1)
        return iter(self._collection.find(query, projection))

    def get(self, document_id: str) -> dict | None:
        return self._collection.find_one({"_id": document_id})

    def ids(self) -> set[str]:
        return {doc["_id"] for doc in self._collection.find({}, {"_id": 1})}

    def count(self) -> int:
        return self._collection.count_documents({})

    def replace_many(self, documents: list[dict]) -> None:
        documents = list({d["_id"]: d for d in documents}.values())  # last write of an id wins
        if not documents:
            return
        if not self._embedded:
            from pymongo import ReplaceOne

            self._collection.bulk_write(
                [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in documents], ordered=False
            )
            return
        self.delete_many([d["_id"] for d in documents])
        # montydb's insert_many rejects keys containing "." (repository file paths), which
        # MongoDB accepts since 5.0; its storage layer skips that check as replace_one does.
        self._collection._storage.write_many(self._collection, documents, check_keys=False)

    def delete_many(self, ids: Iterable[str]) -> int:
        wanted = set(ids)
        if not wanted:
            return 0
        if self._embedded:
            # montydb matches `$in` by scanning the list: only ask for ids that exist.
            wanted &= self.ids()
            if not wanted:
                return 0
        return self._collection.delete_many({"_id": {"$in": sorted(wanted)}}).deleted_count


@dataclass
class Warehouse:
    """Warehouse collections (one per data type) and the stage state next to them."""

    client: Any
    database: str
    features_database: str
    embedded: bool

    def documents(self, data_type: str) -> Collection:
        self._check_type(data_type)
        return Collection(self.client[self.database][data_type], self.embedded)

    def raw_state(self, data_type: str) -> Collection:
        self._check_type(data_type)
        return Collection(self.client[self.features_database][f"raw_{data_type}"], self.embedded)

    def chunk_state(self, data_type: str) -> Collection:
        self._check_type(data_type)
        return Collection(self.client[self.features_database][f"chunks_{data_type}"], self.embedded)

    def quarantine(self) -> Collection:
        return Collection(self.client[self.features_database][QUARANTINE], self.embedded)

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
        if data_type not in DATA_TYPES:
            raise ValueError(f"unknown data type {data_type!r}; known: {', '.join(DATA_TYPES)}")


def open_warehouse(
    mongo_uri: str | None, database: str, features_database: str, data_dir: Path
) -> Warehouse:
    if mongo_uri:
        if not mongo_uri.startswith(("mongodb://", "mongodb+srv://")):
            raise ValueError("MONGO_URI must start with mongodb:// or mongodb+srv://")
        return Warehouse(_mongo_client(mongo_uri), database, features_database, embedded=False)
    return Warehouse(
        _montydb_client(data_dir / "warehouse"), database, features_database, embedded=True
    )
