"""Small changes stay small: a backfill of partitions unchanged since their last complete
sync does nothing (no Dagster run, feature store or model) and says so; anything that could
change its output (a warehouse document, the configuration, a write to the feature store)
makes it run again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from llm_twin_features.cli.common import feature_store_of, warehouse_of
from llm_twin_features.definitions import build_definitions
from llm_twin_features.defs.assets import EMBEDDED, IN_SYNC_CHECK
from llm_twin_features.defs.jobs import FEATURE_PIPELINE_JOB
from llm_twin_features.settings import Settings
from llm_twin_features.stores.feature_store import vector_collection

from ..conftest import SAMPLE_CORPUS

COMMAND = [sys.executable, "-m", "llm_twin_features.cli"]


class Cli:
    def __init__(self, data_dir: Path, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "LLM_TWIN_DATA_DIR": str(data_dir), "DAGSTER_HOME": str(home)}
        self.env.pop("EMBEDDING_SERVICE_URL", None)

    def __call__(self, *argv: str, **env: str) -> str:
        result = subprocess.run(
            [*COMMAND, *argv], env={**self.env, **env}, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout + result.stderr  # the stages' progress lines are on stderr

    def runs(self) -> list[dg.DagsterRun]:
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            return list(instance.get_runs())


def skipped(output: str) -> set[str]:
    return {line.split(":")[0] for line in output.splitlines() if "unchanged since run" in line}


def ran(output: str) -> set[str]:
    return {line.split()[1].rstrip(":") for line in output.splitlines() if ": done in" in line}


def test_unchanged_partitions_are_skipped_until_something_changes(data_dir, tmp_path):
    cli = Cli(data_dir, tmp_path / "home")
    cli("ingest", "--no-publish", str(SAMPLE_CORPUS))
    first = cli("backfill")
    assert ran(first) == {"posts", "articles", "repositories"}
    runs = len(cli.runs())

    # Nothing changed: every type is reported unchanged, no Dagster run is made.
    again = cli("backfill")
    assert skipped(again) == {"posts", "articles", "repositories"}
    assert "in sync; skipped" in again and len(cli.runs()) == runs
    # Reading the feature store (a search opens it) leaves its token as it was.
    cli("search", "orchestration with dagster", "--limit", "1")
    assert skipped(cli("backfill")) == {"posts", "articles", "repositories"}

    # A post edited in the warehouse: posts run (and pick the edit up), the rest is skipped.
    post = next(
        d
        for d in map(json.loads, SAMPLE_CORPUS.read_text().splitlines())
        if d["type"] == "posts" and "platform" in d
    )
    edited = tmp_path / "edited.jsonl"
    text = "Zanzibar quokkas audit vector stores every Tuesday."
    edited.write_text(json.dumps({**post, "content": {"text": text}}) + "\n")
    cli("ingest", "--no-publish", str(edited))
    output = cli("backfill")
    assert ran(output) == {"posts"} and skipped(output) == {"articles", "repositories"}
    hit = json.loads(
        cli("search", text, "--type", "posts", "--limit", "1", "--json").split("\n")[0]
    )
    assert hit["document_id"] == post["_id"]
    assert skipped(cli("backfill")) == {"posts", "articles", "repositories"}

    # A write to the feature store behind the pipeline's back: the article type runs again
    # and repairs it.
    settings = Settings(data_dir=data_dir)
    with feature_store_of(settings) as store:
        point = next(store.points(vector_collection("articles")))
        store.delete_points(vector_collection("articles"), [str(point.id)])
    output = cli("backfill")
    assert ran(output) == {"articles"} and "1 embedded" in output
    assert "False" not in cli("audit")  # exits 0 (asserted by Cli) when all is in sync

    # A different configuration (the size limit, here): every type runs again.
    output = cli("backfill", MAX_DOCUMENT_CHARS="150000")
    assert ran(output) == {"posts", "articles", "repositories"}

    # --force runs what is unchanged, every stage of it.
    forced = cli("backfill", "--force", "--type", "posts")
    assert ran(forced) == {"posts"} and "unchanged since run" not in forced
    assert "cleaned posts: 0 written, 30 unchanged" in forced


def test_a_ui_run_of_an_unchanged_partition_reports_its_materializations(data_dir, tmp_path):
    """Runs from Dagster (a UI backfill) skip the stages too, and still report one
    materialization per asset with the run it defers to, and a passing check."""
    cli = Cli(data_dir, tmp_path / "home")
    cli("ingest", "--no-publish", str(SAMPLE_CORPUS))
    cli("backfill", "--type", "repositories")
    with warehouse_of(Settings(data_dir=data_dir)) as warehouse:
        mark = warehouse.sync_marks().get("repositories")
    assert mark is not None and mark["counts"]["documents"] == 13
    job = build_definitions().resolve_job_def(FEATURE_PIPELINE_JOB)
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, partition_key="repositories")
    assert result.success
    materializations = {
        event.asset_key.to_user_string(): event.materialization.metadata
        for event in result.get_asset_materialization_events()
    }
    assert len(materializations) == 4
    for metadata in materializations.values():
        assert metadata["unchanged_since_run"].value == mark["run_id"]
    assert materializations[EMBEDDED.to_user_string()]["vectors_embedded"].value == 0
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == IN_SYNC_CHECK and check.passed
