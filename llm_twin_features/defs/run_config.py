"""The pipeline job's name and the run config that scopes it, without importing Dagster: the
CLI builds runs from them both in its own process and through the stack's webserver
(`runtime/ui_client.py`), where importing Dagster (2 s) is what it avoids."""

from __future__ import annotations

from typing import Any

FEATURE_PIPELINE_JOB = "feature_pipeline_job"
SYNC_OP = "sync_features"  # the one step of every pipeline run (`assets.sync_features`)
PARTITION_TAG = "dagster/partition"


def scope_ops(
    document_ids: list[str] | None, force: bool = False, shard: str | None = None
) -> dict[str, Any]:
    """The `ops` run config of a pipeline run (`assets.ScopeConfig`): these documents (None:
    the whole partition), `force`, or one shard."""
    config = {"document_ids": document_ids, "force": force, "shard": shard}
    return {SYNC_OP: {"config": config}}
