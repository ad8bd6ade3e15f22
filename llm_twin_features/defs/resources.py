"""Dagster resources: thin wrappers that open the store adapters for one step at a time.

Every field can come from the environment through `dg.EnvVar` (see `definitions.py`); unset
store URLs select the embedded defaults under the data dir.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
from pydantic import Field

from llm_twin_features.runtime.dead_runs import owner_tags
from llm_twin_features.settings import (
    BUNDLED_MODEL,
    DEFAULT_CODE_INSTRUCTION,
    DEFAULT_CODE_QUERY_INSTRUCTION,
    Settings,
)
from llm_twin_features.stores.feature_store import FeatureStore, open_feature_store
from llm_twin_features.stores.queue import BrokerConfig
from llm_twin_features.stores.warehouse import Warehouse, open_warehouse


class WarehouseResource(dg.ConfigurableResource):
    """The MongoDB warehouse (montydb when `mongo_uri` is empty) and the stage state."""

    mongo_uri: str = Field(default="", description="mongodb:// URI; empty: embedded montydb")
    database: str = "twin"
    features_database: str = "twin_features"
    data_dir: str = ".data"
    max_document_chars: int = Field(
        default=1_000_000, description="documents with more text are quarantined"
    )

    @contextmanager
    def open(self) -> Iterator[Warehouse]:
        warehouse = open_warehouse(
            self.mongo_uri or None, self.database, self.features_database, Path(self.data_dir)
        )
        try:
            warehouse.ping()
            yield warehouse
        finally:
            warehouse.close()


class FeatureStoreResource(dg.ConfigurableResource):
    """Qdrant (local mode under the data dir when `qdrant_url` is empty)."""

    qdrant_url: str = Field(default="", description="Qdrant server URL; empty: local mode")
    qdrant_api_key: str = ""
    data_dir: str = ".data"
    lock_timeout_seconds: float = 600.0

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Records which process runs this run, so that a run killed outright can be found
        and its pool slot released (see `dead_runs`)."""
        run = getattr(context, "run", None)  # None outside runs (e.g. in a sensor)
        if context.instance is not None and run is not None:
            context.instance.add_run_tags(run.run_id, owner_tags())

    @contextmanager
    def open(self, log=None) -> Iterator[FeatureStore]:
        """Open for one step only: local mode admits one process per folder, and a run that
        kept it between its steps would deadlock with another run holding the `feature_store`
        pool slot while it waits for the folder (a CLI backfill beside `dagster dev`)."""
        store = open_feature_store(
            self.qdrant_url or None,
            self.qdrant_api_key or None,
            Path(self.data_dir),
            self.lock_timeout_seconds,
            on_wait=log.info if log else None,
        )
        try:
            yield store
        finally:
            store.close()


class EmbeddingResource(dg.ConfigurableResource):
    """Which models embed which data type; models load once per process, on first use."""

    embedding_model: str = BUNDLED_MODEL
    code_embedding_model: str = BUNDLED_MODEL
    code_embedding_instruction: str = DEFAULT_CODE_INSTRUCTION
    code_query_instruction: str = DEFAULT_CODE_QUERY_INSTRUCTION
    batch_size: int = 16
    workers: int = Field(default=0, description="parallel encode workers on a CPU; 0: per core")
    service_url: str = Field(default="", description="model server URL; empty: load in-process")

    def settings(self) -> Settings:
        return Settings(
            embedding_model=self.embedding_model,
            code_embedding_model=self.code_embedding_model,
            code_embedding_instruction=self.code_embedding_instruction,
            code_query_instruction=self.code_query_instruction,
            embedding_batch_size=self.batch_size,
            embedding_workers=self.workers,
            embedding_service_url=self.service_url or None,
        )


class EventBrokerResource(dg.ConfigurableResource):
    """RabbitMQ holding warehouse change events (credentials from the environment)."""

    host: str = "127.0.0.1"
    port: int = 5672
    user: str = ""
    password: str = ""
    vhost: str = "/"
    queue: str = "warehouse_changes"

    def config(self) -> BrokerConfig:
        return BrokerConfig(
            host=self.host,
            port=self.port,
            user=self.user or None,
            password=self.password or None,
            vhost=self.vhost,
            queue=self.queue,
        )
