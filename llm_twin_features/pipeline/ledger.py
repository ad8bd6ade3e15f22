"""The sync ledger: what each data type's last complete whole-partition sync saw.

A whole-partition run whose warehouse documents, pipeline configuration and feature-store
collections are all as the last complete sync of its data type left them would change
nothing. It is skipped after one read of the warehouse collection: no feature store opened,
no per-document work, no model (and, from the CLI, no Dagster run at all).

A mark is written only after a whole-partition run whose audit found the type in sync. It
holds a digest of the warehouse documents taken before the run read them (a document edited
during the run makes the next digest differ) and a token of the feature-store collections
taken after the run closed them (any later write, by an event run or anyone else, voids it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from llm_twin_features.domain.dispatchers import ChunkingDispatcher
from llm_twin_features.domain.embedding import Embedder
from llm_twin_features.domain.models import PIPELINE_VERSION
from llm_twin_features.stores.feature_store_state import cleaned_collection, vector_collection
from llm_twin_features.stores.warehouse import Warehouse

# collections -> token of their current state (None: cannot tell, so never skip)
StoreToken = Callable[[Iterable[str]], str | None]


@dataclass(frozen=True)
class SyncInputs:
    """Everything a whole-partition run's output depends on, as comparable strings."""

    warehouse: str  # digest of the type's warehouse documents
    configuration: str  # pipeline version, chunker and model signatures, size limit
    feature_store: str | None  # token of the type's collections


def collections(data_type: str) -> list[str]:
    return [cleaned_collection(data_type), vector_collection(data_type)]


def configuration(data_type: str, embedder: Embedder, max_document_chars: int) -> str:
    return "|".join(
        (
            PIPELINE_VERSION,
            ChunkingDispatcher.signature(data_type, embedder),
            embedder.signature,
            str(max_document_chars),
        )
    )


def warehouse_digest(warehouse: Warehouse, data_type: str) -> str:
    return warehouse.documents(data_type).digest()


def current_inputs(
    warehouse: Warehouse,
    data_type: str,
    embedder: Embedder,
    max_document_chars: int,
    store_token: StoreToken,
) -> SyncInputs:
    return SyncInputs(
        warehouse_digest(warehouse, data_type),
        configuration(data_type, embedder, max_document_chars),
        store_token(collections(data_type)),
    )


def matching_mark(warehouse: Warehouse, data_type: str, inputs: SyncInputs) -> dict | None:
    """The type's mark when the run it records saw exactly `inputs` (nothing to do)."""
    if inputs.feature_store is None:
        return None
    mark = warehouse.sync_marks().get(data_type)
    if mark is None or mark.get("inputs") != asdict(inputs):
        return None
    return mark


def record_mark(
    warehouse: Warehouse,
    data_type: str,
    inputs: SyncInputs,
    run_id: str,
    counts: dict[str, int],
) -> None:
    """Records a complete, audited whole-partition sync (`inputs.feature_store` taken after
    the run closed the store)."""
    if inputs.feature_store is None:
        return
    warehouse.sync_marks().replace_many(
        [
            {
                "_id": data_type,
                "inputs": asdict(inputs),
                "run_id": run_id,
                "at": datetime.now(UTC).isoformat(),
                "counts": counts,
            }
        ]
    )
