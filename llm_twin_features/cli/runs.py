"""Executing runs of the pipeline job for the CLI: what a run is, running several one after
the other with a line before and after each, and running them in this process (`InProcessRuns`:
a command's own, or the run server's, kept between commands)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llm_twin_features.cli.common import err


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


def run_each(runs: list[Run], execute: Callable[[Run, str], Outcome]) -> list[str]:
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


def run_pipeline_here(home: Path, runs: list[Run], trigger: str, force: bool) -> int:
    """The runs in this process, recorded in the Dagster instance at `home`."""
    runner = InProcessRuns(home)
    try:
        return runner.run(runs, trigger, force)
    finally:
        runner.close()


class InProcessRuns:
    """Runs of the pipeline job executed in this process, on the Dagster instance at `home`:
    one command's (about 2 s of importing Dagster, its storage and the definitions first), or
    every command's that the run server (`run_server.py`) takes, kept ready between them."""

    def __init__(self, home: Path) -> None:
        import dagster as dg

        from llm_twin_features.definitions import build_definitions
        from llm_twin_features.defs.run_config import FEATURE_PIPELINE_JOB

        self.home = home
        self.job = build_definitions().resolve_job_def(FEATURE_PIPELINE_JOB)
        self.instance = dg.DagsterInstance.from_config(str(home))

    def close(self) -> None:
        self.instance.dispose()

    def run(self, runs: list[Run], trigger: str, force: bool) -> int:
        stop_reaper = threading.Event()
        # Started once the instance (and its tables) exist: the reaper opens its own.
        threading.Thread(
            target=self._reap, args=(stop_reaper,), daemon=True, name="dead-run-reaper"
        ).start()
        types = dict.fromkeys(run.data_type for run in runs)
        print(f"{trigger}: {', '.join(types)} through the Dagster instance at {self.home}")
        try:
            failed = run_each(runs, lambda run, _: self._execute(run, trigger, force))
        finally:
            stop_reaper.set()
        return report_failures(runs, failed, trigger)

    def _execute(self, run: Run, trigger: str, force: bool) -> Outcome:
        run_config: dict = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
        ops = run.run_config_ops(force)
        if ops:
            run_config["ops"] = ops
        result = self.job.execute_in_process(
            instance=self.instance,
            partition_key=run.data_type,
            tags=run.tags(trigger),
            run_config=run_config,
            raise_on_error=False,
        )
        if not result.success:
            return None, f"FAILED (run {result.run_id})"
        return _materializations(result), ""

    def _reap(self, stop: threading.Event) -> None:
        """A run blocks on a pool slot that a killed run still holds: free such slots, now
        and every few seconds while the runs go on."""
        import dagster as dg

        from llm_twin_features.defs.assets import FEATURE_STORE_POOL
        from llm_twin_features.runtime.dead_runs import release_dead_runs

        with dg.DagsterInstance.from_config(str(self.home)) as own:
            while True:
                for run_id in release_dead_runs(own, [FEATURE_STORE_POOL]):
                    err(f"released the pool slot of run {run_id}: its process is gone")
                if stop.wait(5):
                    return


def report_failures(runs: list[Run], failed: list[str], trigger: str) -> int:
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
