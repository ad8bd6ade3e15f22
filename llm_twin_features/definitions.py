"""The code location: `dagster dev -m llm_twin_features.definitions` or `workspace.yaml`."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from llm_twin_features.defs.assets import feature_assets, warehouse_documents
from llm_twin_features.defs.checks import PIPELINE_SELECTION, audit_job, warehouse_audit
from llm_twin_features.defs.resources import (
    EmbeddingResource,
    EventBrokerResource,
    FeatureStoreResource,
    WarehouseResource,
)
from llm_twin_features.defs.schedules import build_audit_schedule
from llm_twin_features.defs.sensors import (
    audit_repair_job,
    audit_repair_sensor,
    build_sensor,
    warehouse_events_job,
)
from llm_twin_features.settings import Settings

FEATURE_PIPELINE_JOB = "feature_pipeline_job"


def _env(name: str, default: str) -> str | dg.EnvVar:
    """`dg.EnvVar` when the variable is set (its value stays out of the UI), else the default."""
    return dg.EnvVar(name) if os.environ.get(name) else default


def build_resources() -> dict[str, dg.ConfigurableResource]:
    defaults = Settings()
    data_dir = _env("LLM_TWIN_DATA_DIR", str(Path(defaults.data_dir).resolve()))
    return {
        "warehouse": WarehouseResource(
            mongo_uri=_env("MONGO_URI", ""),
            database=_env("MONGO_DATABASE", defaults.mongo_database),
            features_database=_env("FEATURES_DATABASE", defaults.features_database),
            data_dir=data_dir,
            max_document_chars=defaults.max_document_chars,
        ),
        "feature_store": FeatureStoreResource(
            qdrant_url=_env("QDRANT_URL", ""),
            qdrant_api_key=_env("QDRANT_API_KEY", ""),
            data_dir=data_dir,
        ),
        "embedding": EmbeddingResource(
            embedding_model=_env("EMBEDDING_MODEL", defaults.embedding_model),
            code_embedding_model=_env("CODE_EMBEDDING_MODEL", defaults.code_embedding_model),
            code_embedding_instruction=_env(
                "CODE_EMBEDDING_INSTRUCTION", defaults.code_embedding_instruction
            ),
            code_query_instruction=_env("CODE_QUERY_INSTRUCTION", defaults.code_query_instruction),
            service_url=_env("EMBEDDING_SERVICE_URL", ""),
            batch_size=defaults.embedding_batch_size,
            workers=defaults.embedding_workers,
        ),
        "event_broker": EventBrokerResource(
            host=_env("RABBITMQ_HOST", defaults.rabbitmq_host),
            port=(
                dg.EnvVar.int("RABBITMQ_PORT")
                if os.environ.get("RABBITMQ_PORT")
                else defaults.rabbitmq_port
            ),
            user=_env("RABBITMQ_USER", ""),
            password=_env("RABBITMQ_PASSWORD", ""),
            vhost=_env("RABBITMQ_VHOST", defaults.rabbitmq_vhost),
            queue=_env("RABBITMQ_QUEUE", defaults.rabbitmq_queue),
        ),
    }


feature_pipeline_job = dg.define_asset_job(
    FEATURE_PIPELINE_JOB,
    selection=PIPELINE_SELECTION,
    description="Warehouse -> raw -> cleaned -> chunked -> embedded for one data type.",
)


def build_definitions() -> dg.Definitions:
    """The definitions with resources read from the environment as it is now."""
    settings = Settings()
    return dg.Definitions(
        assets=[warehouse_documents, *feature_assets],
        asset_checks=[warehouse_audit],
        jobs=[feature_pipeline_job, warehouse_events_job, audit_job, audit_repair_job],
        sensors=[build_sensor(settings), audit_repair_sensor],
        schedules=[build_audit_schedule(settings)],
        resources=build_resources(),
        # One process per run: models load once, and Qdrant local mode admits one process.
        executor=dg.in_process_executor,
    )


defs = build_definitions()
