"""`backfill`: the four stages for whole partitions or chosen documents, through Dagster."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from llm_twin_features.cli.common import (
    audits,
    err,
    prepare_dagster_home,
    warehouse_of,
    with_running_model_server,
)
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
    from llm_twin_features.runtime.local_stack import (
        helper_model_server,
        model_server_in_environment,
        running_dagster_ui,
    )

    runs = [
        Run(data_type, ids, shard)
        for data_type, ids in scopes.items()
        for shard in (shards if shards and ids is None else [None])
    ]
    # The laptop stack's runs when it runs: no Dagster import here, and no contention with
    # its runs for the feature store.
    ui_url = running_dagster_ui(settings, prepare_dagster_home(settings))
    if ui_url is not None:
        code = _run_through_stack(ui_url, runs, trigger, force)
        if code is not None:
            return code
    # The laptop stack's model server when it runs; else the model loads in a helper process
    # while Dagster is imported here.
    settings = with_running_model_server(settings)
    if settings.embedding_service_url:
        print(f"{trigger}: embedding through {settings.embedding_service_url}", flush=True)
        with model_server_in_environment(settings.embedding_service_url):
            return _run_pipeline(settings, runs, trigger, force)
    if not _needs_model(settings, scopes):
        print(f"{trigger}: nothing to chunk or embed; no model needed", flush=True)
        return _run_pipeline(settings, runs, trigger, force)
    with helper_model_server(settings) as model_server:
        if model_server:
            print(
                f"{trigger}: loading the embedding model meanwhile, in {model_server}", flush=True
            )
        return _run_pipeline(settings, runs, trigger, force)


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


@dataclass(frozen=True)
class Run:
    """One run of the pipeline job: a partition, whole (or one shard of it) or some ids."""

    data_type: str
    document_ids: list[str] | None = None
    shard: str | None = None

    @property
    def label(self) -> str:
        return f"{self.data_type} shard {self.shard}" if self.shard else self.data_type

    @property
    def scope(self) -> str:
        if self.document_ids is not None:
            return f"{len(self.document_ids)} documents"
        return "one shard" if self.shard else "whole partition"

    def run_config_ops(self, force: bool) -> dict | None:
        """The run's `ops` config; None: the whole partition, unforced (the job's default)."""
        from llm_twin_features.defs.run_config import scope_ops

        if self.document_ids is None and not force and not self.shard:
            return None
        return scope_ops(self.document_ids, force, self.shard)

    def tags(self, trigger: str) -> dict[str, str]:
        tags = {"llm_twin/trigger": trigger}
        if self.shard:
            tags["llm_twin/shard"] = self.shard
        return tags


# What executing one run gave: its materializations (asset name -> metadata), or None and
# what to say about its failure.
Outcome = tuple[dict[str, dict] | None, str]


def _run_each(runs: list[Run], execute: Callable[[Run, str], Outcome]) -> list[str]:
    """Executes the runs one after the other with a line before and after each; the labels
    of those that failed."""
    from llm_twin_features.defs.run_config import FEATURE_PIPELINE_JOB

    failed = []
    for number, run in enumerate(runs, start=1):
        prefix = f"[{number}/{len(runs)}] {run.label}"
        print(f"{prefix}: running {FEATURE_PIPELINE_JOB} ({run.scope})", flush=True)
        started = time.perf_counter()
        materializations, failure = execute(run, prefix)
        if materializations is None:
            failed.append(run.label)
            err(f"{prefix}: {failure}")
            continue
        seconds = time.perf_counter() - started
        print(f"{prefix}: done in {seconds:.1f} s: {_summary(materializations)}", flush=True)
    return failed


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
        failed = _run_each(runs, execute)
    except KeyboardInterrupt:  # the run is the stack's: it goes on
        if launched:
            err(f"stopped waiting; run {url}/runs/{launched[-1]} goes on in the stack")
        return 130
    return _report_failures(runs, failed, trigger)


def _run_pipeline(settings: Settings, runs: list[Run], trigger: str, force: bool) -> int:
    home = prepare_dagster_home(settings)
    import dagster as dg

    from llm_twin_features.definitions import build_definitions
    from llm_twin_features.defs.assets import FEATURE_STORE_POOL
    from llm_twin_features.defs.run_config import FEATURE_PIPELINE_JOB
    from llm_twin_features.runtime.dead_runs import release_dead_runs

    job = build_definitions().resolve_job_def(FEATURE_PIPELINE_JOB)
    stop_reaper = threading.Event()

    def reap() -> None:
        """A run blocks on a pool slot that a killed run still holds: free such slots, now
        and every few seconds while the runs go on."""
        with dg.DagsterInstance.from_config(str(home)) as own:
            while True:
                for run_id in release_dead_runs(own, [FEATURE_STORE_POOL]):
                    err(f"released the pool slot of run {run_id}: its process is gone")
                if stop_reaper.wait(5):
                    return

    with dg.DagsterInstance.from_config(str(home)) as instance:

        def execute(run: Run, prefix: str) -> Outcome:
            run_config: dict = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
            ops = run.run_config_ops(force)
            if ops:
                run_config["ops"] = ops
            result = job.execute_in_process(
                instance=instance,
                partition_key=run.data_type,
                tags=run.tags(trigger),
                run_config=run_config,
                raise_on_error=False,
            )
            if not result.success:
                return None, f"FAILED (run {result.run_id})"
            return _materializations(result), ""

        # Started once the instance (and its tables) exist: the reaper opens its own.
        threading.Thread(target=reap, daemon=True, name="dead-run-reaper").start()
        types = dict.fromkeys(run.data_type for run in runs)
        print(f"{trigger}: {', '.join(types)} through the Dagster instance at {home}")
        failed = _run_each(runs, execute)
    stop_reaper.set()
    return _report_failures(runs, failed, trigger)


def _report_failures(runs: list[Run], failed: list[str], trigger: str) -> int:
    if not failed:
        return 0
    sharded = any(run.shard for run in runs)
    rerun = " (a failed shard alone: --type T --shard I/N)" if sharded else ""
    err(f"{trigger} failed for {', '.join(failed)}; see the runs in the Dagster UI{rerun}")
    return 1


def _materializations(result) -> dict[str, dict]:
    """asset name -> the metadata of its materialization in an in-process run's result."""
    metadata = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        metadata[materialization.asset_key.to_user_string()] = {
            k: v.value for k, v in materialization.metadata.items()
        }
    return metadata


def _summary(metadata: dict[str, dict]) -> str:
    """One line of a run's materializations (asset name -> metadata)."""
    embedded = metadata.get("embedded_chunks", {})
    raw = metadata.get("raw_documents", {})
    return (
        f"{raw.get('documents_in_scope', 0)} documents, {raw.get('quarantined', 0)} quarantined, "
        f"{embedded.get('chunks', 0)} chunks, {embedded.get('vectors_embedded', 0)} embedded, "
        f"{embedded.get('vectors_reused', 0)} reused"
    )
