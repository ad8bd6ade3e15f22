"""The four stages, free of Dagster: each reads its upstream's stored state, writes its own,
and reports what it did. Every stage is incremental and idempotent:

- a scope is a list of document ids, or None for the whole data type;
- a document whose content hash (and pipeline/model signature) is unchanged is skipped;
- a document missing upstream (deleted, or now invalid) is removed from this stage;
- a chunk whose text and model are unchanged keeps its vector.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from llm_twin_features.domain.data_types import spec_of
from llm_twin_features.domain.dispatchers import ChunkingDispatcher, CleaningDispatcher
from llm_twin_features.domain.embedding import Embedder
from llm_twin_features.domain.models import (
    PIPELINE_VERSION,
    ChunkedDocument,
    CleanedDocument,
    EmbeddedChunk,
    RawDocument,
    document_point_id,
)
from llm_twin_features.domain.shards import Shard
from llm_twin_features.domain.sparse import document_vector
from llm_twin_features.domain.validation import (
    DEFAULT_MAX_DOCUMENT_CHARS,
    admit,
    describe_error,
    validate,
)
from llm_twin_features.pipeline import generations
from llm_twin_features.stores.feature_store import (
    FeatureStore,
    Point,
    SparseVector,
    cleaned_collection,
    generation_collection,
)
from llm_twin_features.stores.warehouse import Warehouse

Progress = Callable[[str], Any]
EMBED_SLICE = 512  # texts per encode call: progress is reported between slices


def _quiet(_: str) -> None:
    pass


def warm_up() -> None:
    """Imports what the stages and the embedded warehouse import on first use (unstructured's
    cleaners, LangChain's splitter, montydb: 0.45 s that commands which never clean or chunk
    do not pay), for a process that prepares for a run before it has one
    (`runtime/run_worker.py`)."""
    import langchain_text_splitters  # noqa: F401
    import montydb  # noqa: F401
    import unstructured.cleaners.core  # noqa: F401


@dataclass
class StageReport:
    """What one stage did for one data type; becomes the asset's materialization metadata."""

    stage: str
    data_type: str
    in_scope: int = 0
    upserted: int = 0
    skipped_unchanged: int = 0
    deleted: int = 0
    quarantined: dict[str, str] = field(default_factory=dict)
    chunks: int = 0
    vectors_embedded: int = 0
    vectors_reused: int = 0
    seconds: float = 0.0
    model_id: str | None = None
    collection: str | None = None  # the generation written (embedded stage)
    serving: str | None = None  # the generation search reads, when it is another one

    @property
    def chunks_per_second(self) -> float:
        return self.vectors_embedded / self.seconds if self.seconds else 0.0


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _quarantine(
    warehouse: Warehouse,
    data_type: str,
    stage: str,
    scope_ids: Iterable[str],
    reasons: dict[str, str],
) -> None:
    """Records this stage's verdicts for the ids it looked at: new reasons in, cleared ones out."""
    collection = warehouse.quarantine()
    keys = {f"{data_type}:{i}" for i in scope_ids}
    previous = (
        {q["_id"] for q in collection.find(sorted(keys)) if q.get("stage") == stage}
        if keys
        else set()
    )
    collection.delete_many(previous - {f"{data_type}:{i}" for i in reasons})
    collection.replace_many(
        [
            {
                "_id": f"{data_type}:{entry_id}",
                "data_type": data_type,
                "entry_id": entry_id,
                "stage": stage,
                "reason": reason,
                "at": _now(),
            }
            for entry_id, reason in reasons.items()
        ]
    )


def shard_scope(
    warehouse: Warehouse, store: FeatureStore, data_type: str, shard: Shard
) -> list[str]:
    """Every document id of the shard that any stage knows of: in the warehouse, the stage
    state or the feature store. A run scoped to them processes the shard's documents and
    removes the features of those that left the warehouse, as a whole-partition run does
    for all of them."""
    known = set(warehouse.documents(data_type).ids())
    known |= warehouse.raw_state(data_type).ids() | warehouse.chunk_state(data_type).ids()
    for collection in [cleaned_collection(data_type), *generations.all_of(store, data_type)]:
        known |= store.document_ids(collection)
    return sorted(entry_id for entry_id in known if shard.holds(entry_id))


# --- raw -------------------------------------------------------------------------------------


def ingest_raw(
    warehouse: Warehouse,
    data_type: str,
    scope: list[str] | None = None,
    progress: Progress = _quiet,
    max_chars: int = DEFAULT_MAX_DOCUMENT_CHARS,
) -> StageReport:
    """Validates warehouse documents into the raw stage state; quarantines invalid ones."""
    started = time.perf_counter()
    report = StageReport("raw", data_type)
    state = warehouse.raw_state(data_type)
    documents = {str(d["_id"]): d for d in warehouse.documents(data_type).find(scope)}
    stored = {d["_id"]: d.get("content_hash") for d in state.find(scope, fields=["content_hash"])}
    report.in_scope = len(set(scope) if scope is not None else set(documents))

    writes = []
    for entry_id, document in documents.items():
        try:
            fingerprint = admit(data_type, document, max_chars).fingerprint()
        except (ValidationError, ValueError) as error:
            report.quarantined[entry_id] = describe_error(error)
            continue
        if stored.get(entry_id) == fingerprint:
            report.skipped_unchanged += 1
            continue
        body = {k: v for k, v in document.items() if k != "_id"}
        writes.append(
            {"_id": entry_id, "content_hash": fingerprint, "document": body, "updated_at": _now()}
        )

    state.replace_many(writes)
    gone = set(stored) - (set(documents) - set(report.quarantined))
    report.deleted = state.delete_many(gone)
    report.upserted = len(writes)
    _quarantine(
        warehouse, data_type, "raw", scope if scope is not None else documents, report.quarantined
    )
    if scope is None:  # forget verdicts on documents that left the warehouse
        _forget_quarantine_of_missing(warehouse, data_type, set(documents))
    report.seconds = time.perf_counter() - started
    progress(
        f"raw {data_type}: {report.upserted} written, {report.skipped_unchanged} unchanged, "
        f"{report.deleted} removed, {len(report.quarantined)} quarantined"
    )
    return report


def _forget_quarantine_of_missing(warehouse: Warehouse, data_type: str, present: set[str]) -> None:
    stale = [q["_id"] for q in warehouse.quarantined(data_type) if q["entry_id"] not in present]
    warehouse.quarantine().delete_many(stale)


def stored_raw(warehouse: Warehouse, data_type: str, scope: list[str] | None) -> list[RawDocument]:
    return [
        validate(data_type, {**s["document"], "_id": s["_id"]})
        for s in warehouse.raw_state(data_type).find(scope)
    ]


# --- cleaned ---------------------------------------------------------------------------------


def clean_documents(
    warehouse: Warehouse,
    store: FeatureStore,
    data_type: str,
    scope: list[str] | None = None,
    progress: Progress = _quiet,
) -> StageReport:
    """Cleans raw documents into the `cleaned_{type}` snapshot."""
    started = time.perf_counter()
    report = StageReport("cleaned", data_type)
    collection = store.ensure_cleaned_collection(data_type)
    raw_documents = stored_raw(warehouse, data_type, scope)
    existing = {str(p.id): p.payload or {} for p in store.points(collection, scope)}
    report.in_scope = len(raw_documents)

    points = []
    for raw in raw_documents:
        point_id = document_point_id(data_type, raw.entry_id)
        payload = existing.get(point_id, {})
        fingerprint = raw.fingerprint()
        if (
            payload.get("content_hash") == fingerprint
            and payload.get("pipeline_version") == PIPELINE_VERSION
        ):
            report.skipped_unchanged += 1
            continue
        cleaned = CleaningDispatcher.dispatch(data_type, raw)
        if not cleaned.cleaned_content.strip():
            report.quarantined[raw.entry_id] = "no text left after cleaning"
            continue
        points.append(Point(point_id, cleaned.payload()))

    store.upsert(collection, points)
    keep = {document_point_id(data_type, r.entry_id) for r in raw_documents} - {
        document_point_id(data_type, i) for i in report.quarantined
    }
    gone = [pid for pid in existing if pid not in keep]
    store.delete_points(collection, gone)
    report.upserted, report.deleted = len(points), len(gone)
    _quarantine(
        warehouse, data_type, "cleaned", [r.entry_id for r in raw_documents], report.quarantined
    )
    report.seconds = time.perf_counter() - started
    progress(
        f"cleaned {data_type}: {report.upserted} written, {report.skipped_unchanged} unchanged, "
        f"{report.deleted} removed"
    )
    return report


def stored_cleaned(
    store: FeatureStore, data_type: str, scope: list[str] | None
) -> list[CleanedDocument]:
    spec = spec_of(data_type)
    return [
        CleanedDocument.from_payload(p.payload, spec.author_keys, spec.metadata_fields)
        for p in store.points(cleaned_collection(data_type), scope)
        if p.payload
    ]


# --- chunked ---------------------------------------------------------------------------------


def chunk_documents(
    warehouse: Warehouse,
    store: FeatureStore,
    data_type: str,
    embedder: Embedder,
    scope: list[str] | None = None,
    progress: Progress = _quiet,
) -> StageReport:
    """Chunks cleaned documents into the chunk stage state (keyed by document id)."""
    started = time.perf_counter()
    report = StageReport("chunked", data_type, model_id=embedder.signature)
    state = warehouse.chunk_state(data_type)
    cleaned_documents = stored_cleaned(store, data_type, scope)
    stored = {
        d["_id"]: (d.get("content_hash"), d.get("chunker"))
        for d in state.find(scope, fields=["content_hash", "chunker"])
    }
    signature = ChunkingDispatcher.signature(data_type, embedder)
    report.in_scope = len(cleaned_documents)

    writes = []
    for cleaned in cleaned_documents:
        if stored.get(cleaned.entry_id) == (cleaned.content_hash, signature):
            report.skipped_unchanged += 1
            continue
        chunked = ChunkingDispatcher.dispatch(cleaned, embedder)
        report.chunks += len(chunked.chunks)
        body = chunked.model_dump(exclude={"entry_id", "author_keys"})
        writes.append({"_id": chunked.entry_id, **body})

    state.replace_many(writes)
    gone = set(stored) - {c.entry_id for c in cleaned_documents}
    report.deleted = state.delete_many(gone)
    report.upserted = len(writes)
    report.seconds = time.perf_counter() - started
    progress(
        f"chunked {data_type}: {report.upserted} documents into {report.chunks} chunks, "
        f"{report.skipped_unchanged} unchanged, {report.deleted} removed"
    )
    return report


def stored_chunks(
    warehouse: Warehouse, data_type: str, scope: list[str] | None
) -> list[ChunkedDocument]:
    author_keys = spec_of(data_type).author_keys
    return [
        ChunkedDocument(
            entry_id=d["_id"],
            author_keys=author_keys,
            **{k: v for k, v in d.items() if k != "_id"},
        )
        for d in warehouse.chunk_state(data_type).find(scope)
    ]


# --- embedded --------------------------------------------------------------------------------


def _point(target: EmbeddedChunk, vector: list[float]) -> Point:
    """The chunk's point: its dense vector and its BM25 sparse vector (computed here: it
    needs no model, costs about 0.1 ms a chunk, and depends on the chunk text alone)."""
    sparse = SparseVector(*document_vector(target.chunk.chunk_content))
    return Point(target.point_id, target.payload(), vector, sparse)


def embed_chunks(
    warehouse: Warehouse,
    store: FeatureStore,
    data_type: str,
    embedder: Embedder,
    scope: list[str] | None = None,
    progress: Progress = _quiet,
    query_instruction: str | None = None,
) -> StageReport:
    """Embeds chunks into the model's generation of `vector_{type}` (`generations.py`),
    reusing the vector of every unchanged chunk text. `query_instruction` is recorded with a
    new generation, for searches of it."""
    started = time.perf_counter()
    model_id = embedder.signature
    generations.adopt_legacy(store, data_type)
    collection = generation_collection(data_type, model_id)
    serving = generations.serving(store, data_type)
    report = StageReport("embedded", data_type, model_id=model_id, collection=collection)
    documents = stored_chunks(warehouse, data_type, scope)
    existing = {str(p.id): p.payload or {} for p in store.points(collection, scope)}
    by_document: dict[str, dict[str, str]] = defaultdict(dict)  # document -> chunk_id -> point
    for point_id, payload in existing.items():
        if payload.get("model_id") == model_id:
            by_document[payload.get("document_id", "")][payload.get("chunk_id", "")] = point_id
    report.in_scope = len(documents)

    to_embed: list[EmbeddedChunk] = []
    to_copy: list[tuple[EmbeddedChunk, str]] = []  # reuse the vector of another point
    keep: set[str] = set()
    for document in documents:
        unchanged = True
        for chunk in document.chunks:
            target = EmbeddedChunk.of(document, chunk.chunk_index, model_id)
            keep.add(target.point_id)
            report.chunks += 1
            if existing.get(target.point_id) == target.payload():
                report.vectors_reused += 1
                continue
            unchanged = False
            source = by_document[document.entry_id].get(chunk.chunk_id)
            if source is not None:
                to_copy.append((target, source))
            else:
                to_embed.append(target)
        if unchanged:
            report.skipped_unchanged += 1

    gone = [pid for pid in existing if pid not in keep]
    if to_embed or to_copy:
        recorded = generations.metadata(embedder, query_instruction)
        store.ensure_vector_collection(collection, embedder.dimension, recorded)
    copied = store.vectors(collection, sorted({source for _, source in to_copy}))
    store.upsert(collection, [_point(target, copied[source]) for target, source in to_copy])
    report.vectors_reused += len(to_copy)

    # Longest first, so each encode call pads texts of similar length. The model gets the
    # next slice as soon as it has finished one, while that one is turned into points and
    # written (it releases the GIL while it computes; a model server gets its next request
    # at once): one slice waits encoded at most, one is being written.
    to_embed.sort(key=lambda target: -len(target.chunk.chunk_content))
    slices = [to_embed[i : i + EMBED_SLICE] for i in range(0, len(to_embed), EMBED_SLICE)]
    embed_started = time.perf_counter()
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed") as encoder,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="upsert") as writer,
    ):

        def encode(batch: list[EmbeddedChunk]) -> Future:
            return encoder.submit(embedder.embed, [t.chunk.chunk_content for t in batch])

        encoded = encode(slices[0]) if slices else None
        written: Future | None = None
        done = 0
        for number, batch in enumerate(slices):
            assert encoded is not None  # submitted before each slice
            vectors = encoded.result()
            if number + 1 < len(slices):
                encoded = encode(slices[number + 1])
            points = [_point(t, v) for t, v in zip(batch, vectors, strict=True)]
            if written is not None:
                written.result()  # surfaces a failed write
            written = writer.submit(store.upsert, collection, points)
            done += len(batch)
            rate = done / (time.perf_counter() - embed_started)
            progress(f"embedded {data_type}: {done}/{len(to_embed)} chunks ({rate:.1f} chunks/s)")
        if written is not None:
            written.result()
    report.vectors_embedded = len(to_embed)
    report.upserted = len(to_copy) + len(to_embed)

    store.delete_points(collection, gone)
    report.deleted = len(gone)
    if serving is not None and serving != collection:
        # Another model's generation serves until this one is complete: what left the
        # warehouse leaves search now; edits and new documents come with the switch.
        present = {document.entry_id for document in documents}
        leaving = [
            str(p.id)
            for p in store.points(serving, scope)
            if (p.payload or {}).get("document_id") not in present
        ]
        store.delete_points(serving, leaving)
        report.serving = serving
        progress(
            f"embedded {data_type}: building {collection} for model {model_id} while {serving} "
            f"serves; {len(leaving)} points of removed documents removed from it"
        )
    elif generations.publish_first(store, data_type, collection):
        progress(f"embedded {data_type}: {collection} now serves as vector_{data_type}")
    report.seconds = time.perf_counter() - started
    progress(
        f"embedded {data_type}: {report.vectors_embedded} chunks embedded, "
        f"{report.vectors_reused} reused, {report.deleted} points removed "
        f"({report.seconds:.1f} s, model {model_id})"
    )
    return report
