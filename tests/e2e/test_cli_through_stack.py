"""`backfill` while the laptop stack runs: the command launches its runs through the stack's
Dagster webserver (no Dagster import in the command, no contention with the stack's runs for
Qdrant local); the runs are the stack's, recorded in its instance and run by its processes;
with the stack gone, the command runs them itself again."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time

import dagster as dg
import pytest

from llm_twin_features import cli
from llm_twin_features.cli.common import REPO_DAGSTER_YAML, warehouse_of
from llm_twin_features.defs.run_config import FEATURE_PIPELINE_JOB
from llm_twin_features.runtime.local_stack import (
    LocalStack,
    dagster_ui_file,
    free_port,
    running_dagster_ui,
)
from llm_twin_features.runtime.run_launcher import LAUNCHED_BY_TAG, PRESTARTED
from llm_twin_features.runtime.ui_client import DagsterUi
from llm_twin_features.settings import Settings

from ..conftest import SAMPLE_CORPUS

THROUGH_STACK = "through the running stack's Dagster"
EDITED = "566bf9d7-c55a-45f8-91a6-e55e9b9b1325"
DELETED = "857ce06b-f9a2-4be1-b55c-ca5db3c7b88e"


def run_cli(*argv: str) -> str:
    out, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(errors):
        code = cli.main(list(argv))
    assert code == 0, errors.getvalue()[-3000:]
    return out.getvalue() + errors.getvalue()


def wait_for_stack(settings: Settings, home, timeout: float = 180) -> str:
    """Until the stack's webserver answers and has loaded the code location."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        url = running_dagster_ui(settings, home)
        if url is not None and DagsterUi(url).job_location(FEATURE_PIPELINE_JOB):
            return url
        time.sleep(0.5)
    pytest.fail("the stack's Dagster webserver did not come up")


def test_backfill_launches_through_the_running_stack(data_dir, broker, tmp_path, monkeypatch):
    run_cli("ingest", "--no-publish", str(SAMPLE_CORPUS))
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(REPO_DAGSTER_YAML.read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("AUDIT_CRON", "0 0 1 1 *")
    settings = Settings()
    with (
        open(tmp_path / "stack.log", "w") as log,
        LocalStack(settings, home, ui_port=free_port(), model_port=free_port(), log=log),
    ):
        url = wait_for_stack(settings, home)
        output = run_cli("backfill", "--type", "posts")
        assert f"{THROUGH_STACK} at {url}" in output
        assert "embedded posts:" in output  # the stages' progress, read from the run's logs
        assert "[1/1] posts: done in" in output

        with warehouse_of(settings) as warehouse:
            posts = warehouse.documents("posts")
            post = posts.get(EDITED)
            post["content"]["text"] += "\n\nPostscript: the okapi measurements are in."
            posts.replace_many([post])
            posts.delete_many([DELETED])
        edited = run_cli("backfill", "--type", "posts", "--ids", EDITED)
        assert THROUGH_STACK in edited and "1 embedded" in edited
        deleted = run_cli("backfill", "--type", "posts", "--ids", DELETED)
        assert THROUGH_STACK in deleted

        hits = [
            json.loads(line)
            for line in run_cli(
                "search", "okapi measurements", "--json", "--type", "posts"
            ).splitlines()
        ]
        assert hits[0]["document_id"] == EDITED
        # It used the stack's model server, and left no address of it in this process's
        # environment (later in-process commands and tests would find a dead one there).
        assert "EMBEDDING_SERVICE_URL" not in os.environ
        audit = json.loads(run_cli("audit", "--type", "posts", "--json"))
        assert audit["in_sync"] and audit["warehouse_documents"] == 31

        with dg.DagsterInstance.from_config(str(home)) as instance:
            runs = instance.get_runs(dg.RunsFilter(tags={"llm_twin/trigger": "cli-backfill"}))
        assert len(runs) == 3 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        assert runs[0].tags.get("dagster/partition") == "posts"
        assert runs[0].run_config["ops"]["sync_features"]["config"]["document_ids"] == [DELETED]
        # The first run may go through the code server (no process ready yet); later ones
        # to the stack's processes started ahead of time.
        assert runs[0].tags.get(LAUNCHED_BY_TAG) == PRESTARTED

    # The stack is gone: its address is withdrawn, and the command runs the pipeline itself.
    assert not dagster_ui_file(settings).exists()
    alone = run_cli("backfill", "--type", "posts", "--force")
    assert THROUGH_STACK not in alone and "[1/1] posts: done in" in alone
