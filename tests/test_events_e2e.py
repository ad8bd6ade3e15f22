"""End to end with real processes: the model server, a Dagster code server and the Dagster
daemon run as subprocesses on embedded defaults; an update and a delete published through
the CLI reach search and status within a bounded time; the processes stop on SIGINT."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time

import dagster as dg
import pytest

from llm_twin_features import cli
from llm_twin_features.local_stack import LocalStack, free_port
from llm_twin_features.settings import Settings

from .conftest import SAMPLE_CORPUS

UPDATED = "566bf9d7-c55a-45f8-91a6-e55e9b9b1325"
DELETED = "857ce06b-f9a2-4be1-b55c-ca5db3c7b88e"
TIMEOUT = 180


def run_cli(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(list(argv)) == 0
    return out.getvalue()


@pytest.mark.e2e
def test_update_and_delete_reach_search_and_status(data_dir, broker, tmp_path, monkeypatch):
    run_cli("ingest", "--no-publish", str(SAMPLE_CORPUS))
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # the CLI backfill uses the stack's instance
    monkeypatch.setenv("AUDIT_CRON", "0 0 1 1 *")  # no scheduled audit run in the way
    (home / "dagster.yaml").write_text(cli.REPO_DAGSTER_YAML.read_text())
    settings = Settings()
    log_path = tmp_path / "stack.log"
    with open(log_path, "w") as log:
        stack = LocalStack(settings, home, ui_port=None, model_port=free_port(), log=log)
        with stack:
            # The first batch: the whole posts partition, as a warehouse-wide backfill would.
            with contextlib.redirect_stdout(io.StringIO()):
                cli.main(["backfill", "--type", "posts"])

            from llm_twin_features.cli import _warehouse

            with _warehouse(settings) as warehouse:
                post = warehouse.documents("posts").get(UPDATED)
            text = post["content"]["text"] + "\n\nPostscript: the axolotl benchmark is out."
            with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as handle:
                handle.write(json.dumps({**post, "type": "posts", "content": {"text": text}}))
            published = time.monotonic()
            run_cli("ingest", handle.name)
            run_cli("delete", DELETED, "--type", "posts")

            deadline = published + TIMEOUT
            while time.monotonic() < deadline:
                status = {
                    row["type"]: row
                    for row in map(json.loads, run_cli("status", "--json").splitlines())
                }
                top = json.loads(
                    run_cli(
                        "search",
                        "axolotl benchmark postscript",
                        "--type",
                        "posts",
                        "--json",
                        "--limit",
                        "1",
                    )
                )
                posts = status["posts"]
                if "axolotl" in top["text"] and posts["cleaned"] == 29 and posts["in_sync"]:
                    break
                time.sleep(1)
            else:
                pytest.fail(f"not applied within {TIMEOUT} s; see {log_path.read_text()[-3000:]}")
            assert top["document_id"] == UPDATED
            assert posts["warehouse"] == 31 and posts["orphans"] == 0
            with dg.DagsterInstance.from_config(str(home)) as instance:
                runs = instance.get_runs(dg.RunsFilter(tags={"llm_twin/trigger": "events"}))
                queued = [
                    run.run_id
                    for run in runs
                    if instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_ENQUEUED)
                ]
            # Nothing else was running: the event run started at once (run_coordinator.py).
            assert runs and not queued
            processes = list(stack.processes)
    assert all(p.poll() is not None for p in processes)  # stopped with SIGINT
    assert "warehouse_events_sensor" in log_path.read_text()
