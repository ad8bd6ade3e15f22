"""Dagster resources: thin wrappers that open the store adapters for one step at a time.

Every field can come from the environment through `dg.EnvVar` (`defs()` below); unset store
URLs select the embedded defaults under the data dir. The defaults are `Settings`' own, so each
is written once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from llm_twin_features.runtime.dead_runs import owner_tags
from llm_twin_features.settings import Settings
from llm_twin_features.stores.feature_store import (
    FeatureStore,
    kept_local_store,
    open_feature_store,
)
from llm_twin_features.stores.feature_store_state import state_token
from llm_twin_features.stores.queue import BrokerConfig
from llm_twin_features.stores.warehouse import Warehouse, open_warehouse


def default(name: str) -> Any:
    """The default of a `Settings` field: the one place each default is written."""
    return Settings.model_fields[name].default


class WarehouseResource(dg.ConfigurableResource):
    """The MongoDB warehouse (montydb when `mongo_uri` is empty) and the stage state."""

    mongo_uri: str = Field(default="", description="mongodb:// URI; empty: embedded montydb")
    database: str = default("mongo_database")
    features_database: str = default("features_database")
    data_dir: str = str(default("data_dir"))
    max_document_chars: int = Field(
        default=default("max_document_chars"),
        description="documents with more text are quarantined",
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
    data_dir: str = str(default("data_dir"))
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
        pool slot while it waits for the folder (a CLI backfill beside `dagster dev`). The run
        server's process keeps it open instead (`KeptLocalStore`), and lets go when asked."""
        kept = None if self.qdrant_url else kept_local_store(Path(self.data_dir))
        if kept is not None:
            with kept.use(self.lock_timeout_seconds, on_wait=log.info if log else None) as store:
                yield store
            return
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

    def state_token(self, collections: Iterable[str]) -> str | None:
        """Changes whenever the collections are written (read without opening the store)."""
        return state_token(
            self.qdrant_url or None, self.qdrant_api_key or None, Path(self.data_dir), collections
        )


class EmbeddingResource(dg.ConfigurableResource):
    """Which models embed which data type; models load once per process, on first use."""

    embedding_model: str = default("embedding_model")
    code_embedding_model: str = default("code_embedding_model")
    code_embedding_instruction: str = default("code_embedding_instruction")
    code_query_instruction: str = default("code_query_instruction")
    batch_size: int = default("embedding_batch_size")
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

    host: str = default("rabbitmq_host")
    port: int = default("rabbitmq_port")
    user: str = ""
    password: str = ""
    vhost: str = default("rabbitmq_vhost")
    queue: str = default("rabbitmq_queue")

    def config(self) -> BrokerConfig:
        return BrokerConfig(
            host=self.host,
            port=self.port,
            user=self.user or None,
            password=self.password or None,
            vhost=self.vhost,
            queue=self.queue,
        )


def _env(name: str, default: str) -> str | dg.EnvVar:
    """`dg.EnvVar` when the variable is set (its value stays out of the UI), else the default."""
    return dg.EnvVar(name) if os.environ.get(name) else default


def build_resources() -> dict[str, dg.ConfigurableResource]:
    """The resources, each field from its environment variable when set (as `dg.EnvVar`)."""
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


@dg.definitions
def defs() -> dg.Definitions:
    # One process per run: models load once, and Qdrant local mode admits one process.
    return dg.Definitions(resources=build_resources(), executor=dg.in_process_executor)
