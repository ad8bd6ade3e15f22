"""The feature pipeline as software-defined assets, one partition per data type.

Assets stay thin: each opens its stores, calls one stage of `pipeline/stages.py` and reports what it
did as materialization metadata. Assets that open the feature store share the
`feature_store` pool, so concurrent runs queue for Qdrant local mode's one-process lock.
"""

from typing import TypedDict

import dagster as dg
from pydantic import Field

from llm_twin_features.defs.partitions import data_type_partitions
from llm_twin_features.defs.resources import (
    EmbeddingResource,
    FeatureStoreResource,
    WarehouseResource,
)
from llm_twin_features.domain.data_types import data_types
from llm_twin_features.pipeline import stages as pipeline
from llm_twin_features.pipeline.audit import AuditReport, audit
from llm_twin_features.pipeline.embedders import EmbeddingDispatcher

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


warehouse_documents = dg.AssetSpec(
    "warehouse_documents",
    partitions_def=data_type_partitions,
    group_name="warehouse",
    kinds={"mongodb"},
    description="The crawled documents in MongoDB (database `twin`), one collection per data "
    f"type: {', '.join(data_types())}. Written by the crawlers, not by this pipeline.",
)


def _metadata(report: pipeline.StageReport, scope: list[str] | None) -> dict:
    metadata: dict = {
        "scope": "whole partition" if scope is None else f"{len(scope)} document ids",
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
        metadata["vectors_embedded"] = report.vectors_embedded
        metadata["vectors_reused"] = report.vectors_reused
        metadata["chunks_per_second"] = dg.MetadataValue.float(round(report.chunks_per_second, 2))
    return metadata


@dg.asset(
    deps=[warehouse_documents],
    **STAGE,
    kinds={"mongodb"},
    description="Warehouse documents validated against their type's model and snapshotted in "
    "the `twin_features` database; invalid ones are quarantined with a reason.",
)
def raw_documents(
    context: dg.AssetExecutionContext, config: ScopeConfig, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    with warehouse.open() as store:
        report = pipeline.ingest_raw(
            store,
            context.partition_key,
            config.document_ids,
            context.log.info,
            max_chars=warehouse.max_document_chars,
        )
    return dg.MaterializeResult(metadata=_metadata(report, config.document_ids))


@dg.asset(
    deps=[raw_documents],
    **STAGE,
    kinds={"qdrant"},
    pool=FEATURE_STORE_POOL,
    description="Cleaned documents in Qdrant `cleaned_{type}` (no vectors): the snapshot that "
    "fine-tuning datasets are built from.",
)
def cleaned_documents(
    context: dg.AssetExecutionContext,
    config: ScopeConfig,
    warehouse: WarehouseResource,
    feature_store: FeatureStoreResource,
) -> dg.MaterializeResult:
    with warehouse.open() as state, feature_store.open(context.log) as store:
        report = pipeline.clean_documents(
            state, store, context.partition_key, config.document_ids, context.log.info
        )
    return dg.MaterializeResult(metadata=_metadata(report, config.document_ids))


@dg.asset(
    deps=[cleaned_documents],
    **STAGE,
    kinds={"mongodb"},
    pool=FEATURE_STORE_POOL,
    description="Cleaned documents split into chunks that fit the embedding model's token "
    "window, stored per document in the `twin_features` database.",
)
def chunked_documents(
    context: dg.AssetExecutionContext,
    config: ScopeConfig,
    warehouse: WarehouseResource,
    feature_store: FeatureStoreResource,
    embedding: EmbeddingResource,
) -> dg.MaterializeResult:
    embedder = EmbeddingDispatcher.embedder(context.partition_key, embedding.settings())
    with warehouse.open() as state, feature_store.open(context.log) as store:
        report = pipeline.chunk_documents(
            state, store, context.partition_key, embedder, config.document_ids, context.log.info
        )
    return dg.MaterializeResult(metadata=_metadata(report, config.document_ids))


def _check_result(report: AuditReport, scope: list[str] | None) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=IN_SYNC_CHECK,
        passed=report.in_sync,
        metadata={
            "scope": "whole partition" if scope is None else f"the run's {len(scope)} documents",
            **report.counts(),
            "examples": dg.MetadataValue.json(report.examples()),
        },
    )


@dg.asset(
    deps=[chunked_documents],
    **STAGE,
    kinds={"qdrant", "pytorch"},
    pool=FEATURE_STORE_POOL,
    description="Embedded chunks in Qdrant `vector_{type}` (cosine), the snapshot RAG "
    "retrieves from. Unchanged chunk texts keep their vectors.",
    check_specs=[
        dg.AssetCheckSpec(
            IN_SYNC_CHECK,
            asset="embedded_chunks",
            description="Every valid warehouse document has a current cleaned point and at "
            "least one vector, built by the configured model; no orphan points. Checks the "
            "run's documents (all of the partition for a whole-partition run); the scheduled "
            "warehouse_audit checks every partition in full.",
        )
    ],
)
def embedded_chunks(
    context: dg.AssetExecutionContext,
    config: ScopeConfig,
    warehouse: WarehouseResource,
    feature_store: FeatureStoreResource,
    embedding: EmbeddingResource,
) -> dg.MaterializeResult:
    embedder = EmbeddingDispatcher.embedder(context.partition_key, embedding.settings())
    with warehouse.open() as state, feature_store.open(context.log) as store:
        report = pipeline.embed_chunks(
            state, store, context.partition_key, embedder, config.document_ids, context.log.info
        )
        drift = audit(
            state,
            store,
            context.partition_key,
            embedder,
            warehouse.max_document_chars,
            scope=config.document_ids,
        )
        check = _check_result(drift, config.document_ids)
    return dg.MaterializeResult(
        metadata=_metadata(report, config.document_ids), check_results=[check]
    )


feature_assets = [raw_documents, cleaned_documents, chunked_documents, embedded_chunks]


def scoped_run_config(document_ids: list[str]) -> dg.RunConfig:
    """Run config that scopes every stage to the given documents."""
    scope = ScopeConfig(document_ids=document_ids)
    return dg.RunConfig(ops={asset.key.path[-1]: scope for asset in feature_assets})


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(assets=[warehouse_documents, *feature_assets])
