"""The feature pipeline as software-defined assets, one partition per data type.

The four stage assets (raw, cleaned, chunked, embedded) are computed by one step,
`sync_features`, which stays thin: it opens its stores once, calls the stages of
`pipeline/stages.py` in order and reports each as its own materialization with what it did.
One step per run rather than one per asset: a small change pays Dagster's step overhead
and Qdrant local's load of every point once, not four and three times. The step takes the
`feature_store` pool, so concurrent runs queue for Qdrant local mode's one-process lock.
"""

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any, TypedDict

import dagster as dg
from pydantic import Field

from llm_twin_features.defs.partitions import data_type_partitions
from llm_twin_features.defs.resources import (
    EmbeddingResource,
    FeatureStoreResource,
    WarehouseResource,
)
from llm_twin_features.defs.run_config import SYNC_OP, scope_ops
from llm_twin_features.domain.data_types import data_types
from llm_twin_features.domain.embedding import Embedder
from llm_twin_features.domain.shards import Shard
from llm_twin_features.pipeline import generations, ledger
from llm_twin_features.pipeline import stages as pipeline
from llm_twin_features.pipeline.audit import AuditReport, audit
from llm_twin_features.pipeline.embedders import EmbeddingDispatcher
from llm_twin_features.stores.feature_store import FeatureStore
from llm_twin_features.stores.warehouse import Warehouse

GROUP = "feature_pipeline"
# A store that is briefly unreachable (or a Qdrant local folder held too long) fails the step
# with a clear message; the step is retried, and stages are idempotent, so a retry converges.
STORE_RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL)


class _StageArgs(TypedDict):
    """The keyword arguments of `dg.asset` that every stage asset shares (typed for `**`)."""

    partitions_def: dg.StaticPartitionsDefinition
    group_name: str
    retry_policy: dg.RetryPolicy


# What every stage asset shares: one partition per data type, the group, the retry policy.
STAGE: _StageArgs = {
    "partitions_def": data_type_partitions,
    "group_name": GROUP,
    "retry_policy": STORE_RETRY,
}
FEATURE_STORE_POOL = "feature_store"
IN_SYNC_CHECK = "in_sync_with_warehouse"


class ScopeConfig(dg.Config):
    """Which documents of the partition to process."""

    document_ids: list[str] | None = Field(
        default=None,
        description="Document ids to process; empty means the whole partition, which also "
        "removes features of documents no longer in the warehouse.",
    )
    force: bool = Field(
        default=False,
        description="Run every stage even when the partition is as its last complete sync "
        "left it (whole-partition runs otherwise stop after one read of the warehouse).",
    )
    shard: str | None = Field(
        default=None,
        description="'I/N': only the documents whose id hashes to shard I (0-based) of N, "
        "removing the features of those that left the warehouse; the N shards of a partition "
        "cover it exactly once and can run in parallel runs (`backfill --shards N`).",
    )


warehouse_documents = dg.AssetSpec(
    "warehouse_documents",
    partitions_def=data_type_partitions,
    group_name="warehouse",
    kinds={"mongodb"},
    description="The crawled documents in MongoDB (database `twin`), one collection per data "
    f"type: {', '.join(data_types())}. Written by the crawlers, not by this pipeline.",
)


def _metadata(report: pipeline.StageReport, scope: str) -> dict:
    metadata: dict = {
        "scope": scope,
        "documents_in_scope": report.in_scope,
        "upserted": report.upserted,
        "skipped_unchanged": report.skipped_unchanged,
        "deleted": report.deleted,
        "quarantined": len(report.quarantined),
        "seconds": dg.MetadataValue.float(round(report.seconds, 3)),
    }
    if report.quarantined:
        metadata["quarantine_reasons"] = dg.MetadataValue.json(report.quarantined)
    if report.stage in ("chunked", "embedded"):
        metadata["chunks"] = report.chunks
        metadata["model_id"] = report.model_id
    if report.stage == "embedded":
        metadata["collection"] = report.collection
        if report.serving:
            metadata["serving_collection"] = report.serving
        metadata["vectors_embedded"] = report.vectors_embedded
        metadata["vectors_reused"] = report.vectors_reused
        metadata["chunks_per_second"] = dg.MetadataValue.float(round(report.chunks_per_second, 2))
    return metadata


RAW = dg.AssetKey("raw_documents")
CLEANED = dg.AssetKey("cleaned_documents")
CHUNKED = dg.AssetKey("chunked_documents")
EMBEDDED = dg.AssetKey("embedded_chunks")
FEATURE_ASSET_KEYS = (RAW, CLEANED, CHUNKED, EMBEDDED)

feature_specs = [
    dg.AssetSpec(
        RAW,
        deps=[warehouse_documents],
        kinds={"mongodb"},
        description="Warehouse documents validated against their type's model and snapshotted "
        "in the `twin_features` database; invalid ones are quarantined with a reason.",
    ),
    dg.AssetSpec(
        CLEANED,
        deps=[RAW],
        kinds={"qdrant"},
        description="Cleaned documents in Qdrant `cleaned_{type}` (no vectors): the snapshot "
        "that fine-tuning datasets are built from.",
    ),
    dg.AssetSpec(
        CHUNKED,
        deps=[CLEANED],
        kinds={"mongodb"},
        description="Cleaned documents split into chunks that fit the embedding model's token "
        "window, stored per document in the `twin_features` database.",
    ),
    dg.AssetSpec(
        EMBEDDED,
        deps=[CHUNKED],
        kinds={"qdrant", "pytorch"},
        description="Embedded chunks in Qdrant `vector_{type}` (cosine), the snapshot RAG "
        "retrieves from. Unchanged chunk texts keep their vectors.",
    ),
]
in_sync_check = dg.AssetCheckSpec(
    IN_SYNC_CHECK,
    asset=EMBEDDED,
    description="Every valid warehouse document has a current cleaned point and at least one "
    "vector, built by the configured model; no orphan points. Checks the run's documents (all "
    "of the partition for a whole-partition run); the scheduled warehouse_audit checks every "
    "partition in full.",
)


def _check_result(report: AuditReport, scope: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=EMBEDDED,
        check_name=IN_SYNC_CHECK,
        passed=report.in_sync,
        metadata={
            "scope": scope,
            **report.counts(),
            "examples": dg.MetadataValue.json(report.examples()),
        },
    )


def _unchanged(
    context: dg.AssetExecutionContext, mark: dict, started: float
) -> Iterator[dg.MaterializeResult]:
    """The materializations of a run that found its partition as its last sync left it."""
    counts = mark.get("counts", {})
    context.log.info(
        f"{context.partition_key}: warehouse, configuration and feature store unchanged since "
        f"run {mark.get('run_id')} ({mark.get('at')}); nothing to do"
    )
    for key in FEATURE_ASSET_KEYS:
        if key not in context.selected_asset_keys:
            continue
        metadata: dict = {
            "scope": "whole partition",
            "documents_in_scope": counts.get("documents", 0),
            "upserted": 0,
            "skipped_unchanged": counts.get("documents", 0) - counts.get("quarantined", 0),
            "deleted": 0,
            "quarantined": counts.get("quarantined", 0),
            "unchanged_since_run": mark.get("run_id"),
            "seconds": dg.MetadataValue.float(round(time.perf_counter() - started, 3)),
        }
        checks = []
        if key == EMBEDDED:
            metadata.update(chunks=counts.get("chunks", 0), vectors_embedded=0)
            metadata["vectors_reused"] = counts.get("chunks", 0)
            if in_sync_check.key in context.selected_asset_check_keys:
                checks.append(
                    dg.AssetCheckResult(
                        asset_key=EMBEDDED,
                        check_name=IN_SYNC_CHECK,
                        passed=True,
                        metadata={
                            "scope": "whole partition",
                            "unchanged_since_run": mark.get("run_id"),
                        },
                    )
                )
        yield dg.MaterializeResult(asset_key=key, metadata=metadata, check_results=checks)


@dg.multi_asset(
    name=SYNC_OP,
    specs=feature_specs,
    check_specs=[in_sync_check],
    can_subset=True,
    pool=FEATURE_STORE_POOL,
    **STAGE,
    description="The four stages of one data type in one step (one pool slot, one open of "
    "the feature store per run), each reported as its own materialization as it finishes. A "
    "whole-partition run whose inputs are as its last complete sync left them stops after "
    "one read of the warehouse.",
)
def sync_features(
    context: dg.AssetExecutionContext,
    config: ScopeConfig,
    warehouse: WarehouseResource,
    feature_store: FeatureStoreResource,
    embedding: EmbeddingResource,
) -> Iterator[dg.MaterializeResult]:
    started = time.perf_counter()
    data_type, scope = context.partition_key, config.document_ids
    selected = context.selected_asset_keys
    settings = embedding.settings()
    embedder = EmbeddingDispatcher.embedder(data_type, settings)
    max_chars = warehouse.max_document_chars
    shard = Shard.parse(config.shard) if config.shard else None
    if shard is not None and scope is not None:
        raise ValueError("give document_ids or a shard, not both")
    label = "whole partition" if scope is None else f"{len(scope)} document ids"
    with warehouse.open() as state, contextlib.ExitStack() as opened:
        before: ledger.SyncInputs | None = None
        if scope is None and shard is None:
            before = ledger.current_inputs(
                state, data_type, embedder, max_chars, feature_store.state_token
            )
            mark = None if config.force else ledger.matching_mark(state, data_type, before)
            if mark is not None:
                yield from _unchanged(context, mark, started)
                return
        # Opened once for the step, and only when a stage (or the shard's ids) needs it.
        store = None
        if shard is not None or selected & {CLEANED, CHUNKED, EMBEDDED}:
            store = opened.enter_context(feature_store.open(context.log))
        if shard is not None:
            assert store is not None
            scope = pipeline.shard_scope(state, store, data_type, shard)
            label = f"shard {shard} ({len(scope)} documents)"
            context.log.info(f"{data_type}: {label}")
        if RAW in selected:
            report = pipeline.ingest_raw(
                state, data_type, scope, context.log.info, max_chars=max_chars
            )
            yield dg.MaterializeResult(asset_key=RAW, metadata=_metadata(report, label))
        if store is None:
            return
        drift = None
        if CLEANED in selected:
            report = pipeline.clean_documents(state, store, data_type, scope, context.log.info)
            yield dg.MaterializeResult(asset_key=CLEANED, metadata=_metadata(report, label))
        if CHUNKED in selected:
            report = pipeline.chunk_documents(
                state, store, data_type, embedder, scope, context.log.info
            )
            yield dg.MaterializeResult(asset_key=CHUNKED, metadata=_metadata(report, label))
        if EMBEDDED in selected:
            query_instruction = EmbeddingDispatcher.query_instruction(data_type, settings)
            report = pipeline.embed_chunks(
                state, store, data_type, embedder, scope, context.log.info, query_instruction
            )
            drift = audit(state, store, data_type, embedder, max_chars, scope=scope)
            if report.serving is not None and report.collection is not None:
                _switch_when_complete(context, state, store, embedder, max_chars, drift, scope)
            checks = []
            if in_sync_check.key in context.selected_asset_check_keys:
                checks.append(_check_result(drift, label))
            yield dg.MaterializeResult(
                asset_key=EMBEDDED, metadata=_metadata(report, label), check_results=checks
            )
        opened.close()  # the feature store's token below must see its files closed
        if (
            before is not None
            and drift is not None
            and drift.in_sync
            and selected >= set(FEATURE_ASSET_KEYS)
        ):
            after = ledger.SyncInputs(
                before.warehouse,
                before.configuration,
                feature_store.state_token(ledger.collections(data_type)),
            )
            counts = {
                "documents": drift.warehouse_documents,
                "quarantined": drift.quarantined,
                "chunks": drift.vectors,
            }
            ledger.record_mark(state, data_type, after, context.run_id, counts)


def _switch_when_complete(
    context: dg.AssetExecutionContext,
    state: Warehouse,
    store: FeatureStore,
    embedder: Embedder,
    max_chars: int,
    drift: AuditReport,
    scope: list[str] | None,
) -> None:
    """The configured model's generation takes over search once the audit of all of it is
    clean (a scoped run audits the rest too: it may be the one that completes it)."""
    data_type = context.partition_key
    whole = drift if scope is None else audit(state, store, data_type, embedder, max_chars)
    if not store.exists(whole.collection):  # nothing to embed yet: no document is valid
        return
    if not whole.in_sync:
        context.log.info(
            f"{data_type}: {whole.collection} is being built for model {embedder.signature} "
            f"({whole.vectors} vectors, drift {whole.counts()}); the serving generation stays"
        )
        return
    previous = generations.switch(store, data_type, whole.collection)
    context.log.info(
        f"{data_type}: vector_{data_type} switched from {previous} to {whole.collection} "
        f"(model {embedder.signature}); {previous} is kept until `llm-twin-features "
        "generations --prune`"
    )


def scoped_run_config(
    document_ids: list[str] | None, force: bool = False, shard: str | None = None
) -> dg.RunConfig:
    """Run config that scopes every stage to the given documents (None: all of them), or to
    one shard of them (`run_config.scope_ops`, which the CLI uses without Dagster)."""
    return dg.RunConfig(ops=scope_ops(document_ids, force, shard))


def _scope_config(run_config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (run_config or {}).get("ops", {}).get(SYNC_OP, {}).get("config", {})


def run_scope(run_config: Mapping[str, Any] | None) -> list[str] | None:
    """The document ids a pipeline run's config scopes it to (None: the whole partition, or a
    shard of it, whose ids only its run computes)."""
    return _scope_config(run_config).get("document_ids")


def run_shard(run_config: Mapping[str, Any] | None) -> str | None:
    """The shard ("I/N") a pipeline run's config scopes it to, if any."""
    return _scope_config(run_config).get("shard")


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(assets=[warehouse_documents, sync_features])
