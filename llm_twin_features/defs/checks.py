"""The scheduled audit: the warehouse against every stage of every data type.

`warehouse_audit` runs in `audit_job` (defs/jobs.py; on `audit_schedule`, or from the UI).
Its metadata has the counts and a few example ids per kind of drift, and the drifted ids
themselves (capped),
which `audit_repair_sensor` turns into scoped repair runs: an event that was lost, or a run
that failed for good, is healed within one audit period.
"""

import dagster as dg
from pydantic import Field

from llm_twin_features.defs.assets import EMBEDDED, FEATURE_STORE_POOL, STORE_RETRY
from llm_twin_features.defs.resources import (
    EmbeddingResource,
    FeatureStoreResource,
    WarehouseResource,
)
from llm_twin_features.domain.data_types import data_types
from llm_twin_features.pipeline.audit import audit
from llm_twin_features.pipeline.embedders import EmbeddingDispatcher
from llm_twin_features.settings import Settings

WAREHOUSE_AUDIT = "warehouse_audit"
REPAIR_IDS_KEY = "repair_ids"


class AuditConfig(dg.Config):
    repair_cap: int = Field(
        default=Settings.model_fields["audit_repair_cap"].default,
        description="drifted ids per type one repair run takes",
    )


@dg.asset_check(
    asset=EMBEDDED,
    name=WAREHOUSE_AUDIT,
    description="Every data type: documents missing from the feature store, stale content, "
    "orphan points, chunks without vectors, vectors built by another model.",
    pool=FEATURE_STORE_POOL,
    retry_policy=STORE_RETRY,
)
def warehouse_audit(
    context: dg.AssetCheckExecutionContext,
    config: AuditConfig,
    warehouse: WarehouseResource,
    feature_store: FeatureStoreResource,
    embedding: EmbeddingResource,
) -> dg.AssetCheckResult:
    settings = embedding.settings()
    metadata: dict = {}
    repair: dict[str, list[str]] = {}
    with warehouse.open() as state, feature_store.open(context.log) as store:
        for data_type in data_types():
            embedder = EmbeddingDispatcher.embedder(data_type, settings)
            report = audit(state, store, data_type, embedder, warehouse.max_document_chars)
            metadata[data_type] = dg.MetadataValue.json(
                {**report.counts(), "examples": report.examples()}
            )
            if not report.in_sync:
                repair[data_type] = report.drifted_ids[: config.repair_cap]
                context.log.warning(f"{data_type}: drift {dict(report.counts())}")
    metadata[REPAIR_IDS_KEY] = dg.MetadataValue.json(repair)
    return dg.AssetCheckResult(passed=not repair, metadata=metadata)


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(asset_checks=[warehouse_audit])
