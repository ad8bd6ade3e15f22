"""Compares the warehouse with every stage of one data type: the basis of the asset checks and
of `llm-twin-features status`."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from pydantic import ValidationError

from llm_twin_features.domain.embedding import Embedder
from llm_twin_features.domain.models import PIPELINE_VERSION
from llm_twin_features.domain.validation import DEFAULT_MAX_DOCUMENT_CHARS, admit
from llm_twin_features.pipeline import generations
from llm_twin_features.stores.feature_store import FeatureStore, cleaned_collection
from llm_twin_features.stores.warehouse import Warehouse

EXAMPLES = 5


@dataclass
class AuditReport:
    data_type: str
    collection: str = ""  # the generation of the vectors audited
    warehouse_documents: int = 0
    quarantined: int = 0
    cleaned_points: int = 0
    chunks: int = 0
    vectors: int = 0
    missing: list[str] = field(default_factory=list)  # valid, but no cleaned point
    stale: list[str] = field(default_factory=list)  # cleaned/vectors from older content
    without_vectors: list[str] = field(default_factory=list)
    chunks_without_vectors: list[str] = field(default_factory=list)  # some chunks lack one
    orphans: list[str] = field(default_factory=list)  # points of no valid warehouse document
    wrong_model: list[str] = field(default_factory=list)  # vectors built by another model

    def drift_kinds(self) -> dict[str, list[str]]:
        """Every kind of drift, empty or not."""
        return {
            "missing": self.missing,
            "stale": self.stale,
            "without_vectors": self.without_vectors,
            "chunks_without_vectors": self.chunks_without_vectors,
            "orphans": self.orphans,
            "wrong_model": self.wrong_model,
        }

    @property
    def drift(self) -> dict[str, list[str]]:
        return {name: ids for name, ids in self.drift_kinds().items() if ids}

    @property
    def in_sync(self) -> bool:
        return not self.drift

    @property
    def needs_embedding(self) -> bool:
        """Drift that a run can only repair by chunking or embedding; orphans it deletes."""
        return any(ids for name, ids in self.drift.items() if name != "orphans")

    @property
    def drifted_ids(self) -> list[str]:
        return sorted({i for ids in self.drift.values() for i in ids})

    def counts(self) -> dict[str, int]:
        data = asdict(self)
        return {
            k: (len(v) if isinstance(v, list) else v)
            for k, v in data.items()
            if k not in ("data_type", "collection")
        }

    def examples(self) -> dict[str, list[str]]:
        return {name: sorted(ids)[:EXAMPLES] for name, ids in self.drift.items()}


def audit(
    warehouse: Warehouse,
    store: FeatureStore,
    data_type: str,
    embedder: Embedder,
    max_chars: int = DEFAULT_MAX_DOCUMENT_CHARS,
    scope: list[str] | None = None,
) -> AuditReport:
    """Drift of the whole data type, or of the documents in `scope` only (what a run scoped
    to those documents touched: its cost stays independent of the partition's size). The
    vectors audited are the configured model's generation (`generations.py`): after a model
    change, the one being built, whose clean audit lets it take over search."""
    report = AuditReport(
        data_type, collection=generations.written(store, data_type, embedder.signature)
    )
    fingerprints: dict[str, str] = {}  # the documents that must have features
    for document in warehouse.documents(data_type).find(scope):
        report.warehouse_documents += 1
        try:
            fingerprints[str(document["_id"])] = admit(data_type, document, max_chars).fingerprint()
        except (ValidationError, ValueError):
            report.quarantined += 1
    empty_after_cleaning = {
        q["entry_id"] for q in warehouse.quarantined(data_type) if q.get("stage") == "cleaned"
    }
    for entry_id in empty_after_cleaning & set(fingerprints):
        report.quarantined += 1
        del fingerprints[entry_id]

    cleaned: dict[str, dict] = {}
    for point in store.points(cleaned_collection(data_type), scope):
        payload = point.payload or {}
        cleaned[payload.get("document_id", "")] = payload
    report.cleaned_points = len(cleaned)
    expected_chunks: dict[str, set[tuple[int, str]]] = {
        d["_id"]: {(c["chunk_index"], c["chunk_id"]) for c in d.get("chunks", [])}
        for d in warehouse.chunk_state(data_type).find(scope, fields=["chunks"])
    }
    report.chunks = sum(len(c) for c in expected_chunks.values())

    # (chunk_index, chunk_id) of each document's vector points; None where a payload lacks one
    vectors: dict[str, set[tuple[int | None, str | None]]] = defaultdict(set)
    # (content hash, pipeline version) of each document's vector points
    vector_stamps: dict[str, set[tuple[str, str]]] = defaultdict(set)
    wrong_model: set[str] = set()
    for point in store.points(report.collection, scope):
        payload = point.payload or {}
        document_id = payload.get("document_id", "")
        vectors[document_id].add((payload.get("chunk_index"), payload.get("chunk_id")))
        stamp = (payload.get("content_hash", ""), payload.get("pipeline_version", ""))
        vector_stamps[document_id].add(stamp)
        if payload.get("model_id") != embedder.signature:
            wrong_model.add(document_id)
        report.vectors += 1

    for entry_id, fingerprint in fingerprints.items():
        cleaned_payload = cleaned.get(entry_id)
        if cleaned_payload is None:
            report.missing.append(entry_id)
            continue
        current_stamp = (fingerprint, PIPELINE_VERSION)  # vectors of older payloads are stale
        current = (
            cleaned_payload.get("content_hash") == fingerprint
            and cleaned_payload.get("pipeline_version") == PIPELINE_VERSION
            and vector_stamps.get(entry_id, {current_stamp}) == {current_stamp}
        )
        if not current:
            report.stale.append(entry_id)
        if not vectors.get(entry_id):
            report.without_vectors.append(entry_id)
        elif not expected_chunks.get(entry_id, set()) <= vectors[entry_id]:
            report.chunks_without_vectors.append(entry_id)
    report.orphans = sorted((set(cleaned) | set(vectors)) - set(fingerprints))
    report.wrong_model = sorted(wrong_model & set(fingerprints))
    return report
