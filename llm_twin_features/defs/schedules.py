"""The audit runs on a schedule; `audit_repair_sensor` repairs what it finds."""

import dagster as dg

from llm_twin_features.defs.checks import AuditConfig, warehouse_audit
from llm_twin_features.defs.jobs import audit_job
from llm_twin_features.settings import Settings


def build_audit_schedule(settings: Settings) -> dg.ScheduleDefinition:
    config = AuditConfig(repair_cap=settings.audit_repair_cap)
    return dg.ScheduleDefinition(
        name="audit_schedule",
        job=audit_job,
        cron_schedule=settings.audit_cron,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        run_config=dg.RunConfig(ops={warehouse_audit.node_def.name: config}),
        description="Audits the feature store against the warehouse (AUDIT_CRON).",
    )


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(schedules=[build_audit_schedule(Settings())])
