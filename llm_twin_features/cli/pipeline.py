"""`backfill`: the four stages for whole partitions or chosen documents, through Dagster."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from llm_twin_features.cli.common import (
    audits,
    err,
    prepare_dagster_home,
    warehouse_of,
    with_running_model_server,
)
from llm_twin_features.cli.runs import Outcome, Run, report_failures, run_each, run_pipeline_here
from llm_twin_features.domain.data_types import data_types
from llm_twin_features.settings import Settings


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    from llm_twin_features.domain.shards import Shard

    if args.ids and not args.type:
        err("error: --ids needs --type")
        return 2
    if args.ids and (args.shards or args.shard):
        err("error: --ids and --shards/--shard exclude each other")
        return 2
    try:
        if args.shards is not None and args.shards < 1:
            raise ValueError(f"--shards takes a number of shards, at least 1, not {args.shards}")
        shards = [Shard.parse(args.shard)] if args.shard else Shard.all_of(args.shards or 1)
    except ValueError as error:
        err(f"error: {error}")
        return 2
    chosen = [args.type] if args.type else list(data_types())
    if not args.ids and not args.force:
        chosen = _changed_since_last_sync(settings, chosen)
        if not chosen:
            return 0
    return run_pipeline(
        settings,
        dict.fromkeys(chosen, args.ids),
        trigger="cli-backfill",
        force=args.force,
        shards=[str(s) for s in shards] if len(shards) > 1 or args.shard else None,
    )


def _changed_since_last_sync(settings: Settings, chosen: list[str]) -> list[str]:
    """The data types whose warehouse documents, configuration or feature store changed since
    their last complete sync (`pipeline/ledger.py`); the others are reported and skipped,
    after one read of the warehouse: no Dagster, feature store or model."""
    from llm_twin_features.pipeline import ledger
    from llm_twin_features.pipeline.embedders import EmbeddingDispatcher
    from llm_twin_features.stores.feature_store_state import state_token

    api_key = settings.qdrant_api_key_value()

    def store_token(collections) -> str | None:
        return state_token(settings.qdrant_url, api_key, settings.resolved_data_dir, collections)

    changed = []
    try:
        with warehouse_of(settings) as warehouse:
            for data_type in chosen:
                embedder = EmbeddingDispatcher.embedder(data_type, settings)  # signature only
                inputs = ledger.current_inputs(
                    warehouse, data_type, embedder, settings.max_document_chars, store_token
                )
                mark = ledger.matching_mark(warehouse, data_type, inputs)
                if mark is None:
                    changed.append(data_type)
                    continue
                counts = mark.get("counts", {})
                print(
                    f"{data_type}: unchanged since run {mark['run_id']} ({mark['at']}): "
                    f"{counts.get('documents', 0)} documents, {counts.get('chunks', 0)} chunks "
                    "in sync; skipped (--force runs it anyway)",
                    flush=True,
                )
    except Exception:  # the runs report store failures themselves, with retries
        return chosen
    return changed


def run_pipeline(
    settings: Settings,
    scopes: Mapping[str, list[str] | None],
    trigger: str,
    force: bool = False,
    shards: list[str] | None = None,
) -> int:
    """One run of the pipeline job per data type (scoped to ids, or whole), with progress;
    `force`: whole partitions run their stages even when unchanged since their last sync;
    `shards` ("I/N"): one run per shard of each whole partition instead."""
    from llm_twin_features.cli.run_server import run_through_server, start_run_server
    from llm_twin_features.runtime.local_stack import running_dagster_ui

    runs = [
        Run(data_type, ids, shard)
        for data_type, ids in scopes.items()
        for shard in (shards if shards and ids is None else [None])
    ]
    # The laptop stack's runs when it runs: no Dagster import here, and no contention with
    # its runs for the feature store.
    home = prepare_dagster_home(settings)
    ui_url = running_dagster_ui(settings, home)
    if ui_url is not None:
        code = _run_through_stack(ui_url, runs, trigger, force)
        if code is not None:
            return code
    # The run server an earlier command left behind: Dagster and the models ready there.
    code = None
    if settings.run_server_idle_seconds > 0:
        code = run_through_server(settings, home, runs, trigger, force)
    if code is None:
        code = _run_here(settings, home, runs, trigger, force, scopes)
        start_run_server(settings, home)  # for the next command
    return code


def _run_here(
    settings: Settings,
    home: Path,
    runs: list[Run],
    trigger: str,
    force: bool,
    scopes: Mapping[str, list[str] | None],
) -> int:
    """The runs in this process; the model in the laptop stack's model server when it runs,
    else loading in a helper process while Dagster is imported here."""
    from llm_twin_features.runtime.local_stack import (
        helper_model_server,
        model_server_in_environment,
    )

    settings = with_running_model_server(settings)
    if settings.embedding_service_url:
        print(f"{trigger}: embedding through {settings.embedding_service_url}", flush=True)
        with model_server_in_environment(settings.embedding_service_url):
            return run_pipeline_here(home, runs, trigger, force)
    if not _needs_model(settings, scopes):
        print(f"{trigger}: nothing to chunk or embed; no model needed", flush=True)
        return run_pipeline_here(home, runs, trigger, force)
    with helper_model_server(settings) as model_server:
        if model_server:
            print(
                f"{trigger}: loading the embedding model meanwhile, in {model_server}", flush=True
            )
        return run_pipeline_here(home, runs, trigger, force)


def _needs_model(settings: Settings, scopes: Mapping[str, list[str] | None]) -> bool:
    """Whether the runs may chunk or embed anything. A backfill of unchanged (or only deleted)
    documents then starts no model server (about 7 CPU-seconds of loading a model for
    nothing); on any doubt, it does. Runs that find work anyway load the model themselves."""
    try:
        with warehouse_of(settings) as warehouse:
            # Never chunked yet (a first backfill): say so before importing the feature store,
            # so that the model starts loading at once.
            if any(warehouse.chunk_state(t).count() == 0 for t in scopes):
                return True
            if all(ids is not None for ids in scopes.values()):
                # Chosen documents: their stage state tells, without the feature store.
                return any(
                    _documents_changed(warehouse, t, ids or [], settings)
                    for t, ids in scopes.items()
                )
        # Whole partitions: the audit finds drift that deleting cannot repair.
        return any(report.needs_embedding for report in audits(settings, scopes))
    except Exception:  # the runs report store failures themselves, with retries
        return True


def _documents_changed(warehouse, data_type: str, ids: list[str], settings: Settings) -> bool:
    """Whether any of these documents is in the warehouse with content (or a chunker) that
    its stage state has not seen; deleted and invalid ones need no model."""
    from pydantic import ValidationError

    from llm_twin_features.domain.dispatchers import ChunkingDispatcher
    from llm_twin_features.domain.validation import admit
    from llm_twin_features.pipeline.embedders import EmbeddingDispatcher

    embedder = EmbeddingDispatcher.embedder(data_type, settings)  # its signature only
    chunker = ChunkingDispatcher.signature(data_type, embedder)
    seen = {d["_id"]: d.get("content_hash") for d in warehouse.raw_state(data_type).find(ids)}
    chunked = {
        d["_id"]: d.get("chunker")
        for d in warehouse.chunk_state(data_type).find(ids, fields=["chunker"])
    }
    for document in warehouse.documents(data_type).find(ids):
        entry_id = str(document["_id"])
        try:
            fingerprint = admit(data_type, document, settings.max_document_chars).fingerprint()
        except (ValidationError, ValueError):
            continue  # quarantined by the run
        if seen.get(entry_id) != fingerprint or chunked.get(entry_id) != chunker:
            return True
    return False


def _run_through_stack(url: str, runs: list[Run], trigger: str, force: bool) -> int | None:
    """The runs launched through the running laptop stack's Dagster webserver, one after
    the other, with the stages' progress; None when it cannot take them (its code location
    not loaded yet): the caller runs them itself."""
    from llm_twin_features.defs.run_config import FEATURE_PIPELINE_JOB, PARTITION_TAG
    from llm_twin_features.runtime.ui_client import DagsterUi, UiError

    ui = DagsterUi(url)
    try:
        location = ui.job_location(FEATURE_PIPELINE_JOB)
    except UiError:
        return None
    if location is None:
        return None
    print(
        f"{trigger}: through the running stack's Dagster at {url} (its run processes and "
        "model server)",
        flush=True,
    )
    launched: list[str] = []

    def execute(run: Run, prefix: str) -> Outcome:
        ops = run.run_config_ops(force)
        try:
            run_id = ui.launch(
                FEATURE_PIPELINE_JOB,
                location,
                {"ops": ops} if ops else {},
                {PARTITION_TAG: run.data_type, **run.tags(trigger)},
            )
            launched.append(run_id)
            err(f"{prefix}: run {url}/runs/{run_id}")
            finished = ui.wait(run_id, on_log=err)
        except UiError as error:
            return None, f"FAILED ({error})"
        if not finished.success:
            return None, f"{finished.status} (run {run_id})"
        return finished.materializations, ""

    try:
        failed = run_each(runs, execute)
    except KeyboardInterrupt:  # the run is the stack's: it goes on
        if launched:
            err(f"stopped waiting; run {url}/runs/{launched[-1]} goes on in the stack")
        return 130
    return report_failures(runs, failed, trigger)
