"""What every command shares: error output, the stores opened from the settings, and the
Dagster instance's home."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from llm_twin_features.settings import Settings

if TYPE_CHECKING:
    from llm_twin_features.pipeline.audit import AuditReport
    from llm_twin_features.stores.feature_store import FeatureStore
    from llm_twin_features.stores.warehouse import Warehouse

REPO_DAGSTER_YAML = Path(__file__).resolve().parents[2] / "dagster.yaml"


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def warehouse_of(settings: Settings) -> Iterator[Warehouse]:
    """The configured warehouse, reachable (or WarehouseUnavailable), closed afterwards."""
    from llm_twin_features.stores.warehouse import open_warehouse

    warehouse = open_warehouse(
        settings.mongo_uri,
        settings.mongo_database,
        settings.features_database,
        settings.resolved_data_dir,
    )
    try:
        warehouse.ping()
        yield warehouse
    finally:
        warehouse.close()


@contextmanager
def feature_store_of(settings: Settings) -> Iterator[FeatureStore]:
    """The configured feature store (waits while another process holds a local one)."""
    from llm_twin_features.stores.feature_store import open_feature_store

    api_key = settings.qdrant_api_key_value()
    store = open_feature_store(
        settings.qdrant_url, api_key, settings.resolved_data_dir, on_wait=err
    )
    try:
        yield store
    finally:
        store.close()


def audits(settings: Settings, scopes: Mapping[str, list[str] | None]) -> list[AuditReport]:
    """The audit of each data type in `scopes`: of its documents with those ids, or of all of
    them (None)."""
    from llm_twin_features.pipeline.audit import audit
    from llm_twin_features.pipeline.embedders import EmbeddingDispatcher

    with warehouse_of(settings) as warehouse, feature_store_of(settings) as store:
        return [
            audit(
                warehouse,
                store,
                data_type,
                EmbeddingDispatcher.embedder(data_type, settings),  # its signature only
                settings.max_document_chars,
                scope=ids,
            )
            for data_type, ids in scopes.items()
        ]


def prepare_dagster_home(settings: Settings) -> Path:
    """DAGSTER_HOME, defaulting to `<data dir>/dagster_home` with the repo's `dagster.yaml`."""
    home = Path(os.environ.get("DAGSTER_HOME") or settings.resolved_data_dir / "dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if not target.exists() and REPO_DAGSTER_YAML.exists():
        shutil.copyfile(REPO_DAGSTER_YAML, target)
    return home.resolve()


def with_running_model_server(settings: Settings) -> Settings:
    """`settings`, pointed at the laptop stack's model server when one runs over the same data
    dir and none is configured: a command then neither imports nor loads a model itself. (The
    runs a backfill starts read it from the environment: `model_server_in_environment`.)"""
    if settings.embedding_service_url:
        return settings
    from llm_twin_features.runtime.local_stack import running_model_server

    url = running_model_server(settings)
    if url is None:
        return settings
    return settings.model_copy(update={"embedding_service_url": url})
