"""The jobs: the four stages for a partition (a backfill, an event batch, a repair) and the
audit. The run launcher, the sensors and the CLI refer to them by these names."""

import dagster as dg

from llm_twin_features.defs import assets, checks
from llm_twin_features.defs.run_config import FEATURE_PIPELINE_JOB

WAREHOUSE_EVENTS_JOB = "warehouse_events_job"
AUDIT_JOB = "audit_job"
AUDIT_REPAIR_JOB = "audit_repair_job"
# Jobs whose runs run the four stages for a partition (what the repair sensor counts as
# covering drift). Runs launched from the UI's "Materialize" run Dagster's own asset job,
# recognised by their asset selection instead.
PIPELINE_JOBS = frozenset({FEATURE_PIPELINE_JOB, WAREHOUSE_EVENTS_JOB, AUDIT_REPAIR_JOB})

# The four stages without the audit check (which covers every type, not one partition).
PIPELINE_SELECTION = dg.AssetSelection.assets(
    *assets.FEATURE_ASSET_KEYS
) - dg.AssetSelection.checks(checks.warehouse_audit)

feature_pipeline_job = dg.define_asset_job(
    FEATURE_PIPELINE_JOB,
    selection=PIPELINE_SELECTION,
    description="Warehouse -> raw -> cleaned -> chunked -> embedded for one data type.",
)
warehouse_events_job = dg.define_asset_job(
    WAREHOUSE_EVENTS_JOB,
    selection=PIPELINE_SELECTION,
    description="Near-real-time sync: the four stages for the document ids of a batch of "
    "warehouse change events (requested by the warehouse_events_sensor sensors).",
    tags={"llm_twin/trigger": "events"},
)
audit_repair_job = dg.define_asset_job(
    AUDIT_REPAIR_JOB,
    selection=PIPELINE_SELECTION,
    description="The four stages for the documents the scheduled audit found drifted.",
    tags={"llm_twin/trigger": "audit-repair"},
)
audit_job = dg.define_asset_job(
    AUDIT_JOB,
    selection=dg.AssetSelection.checks(checks.warehouse_audit),
    description="Audits the feature store against the warehouse (no writes).",
    tags={"llm_twin/trigger": "audit"},
)


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(
        jobs=[feature_pipeline_job, warehouse_events_job, audit_repair_job, audit_job]
    )
