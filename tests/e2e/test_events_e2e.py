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
import psutil
import pytest

from llm_twin_features import cli
from llm_twin_features.cli.common import REPO_DAGSTER_YAML
from llm_twin_features.runtime.local_stack import LocalStack, free_port
from llm_twin_features.runtime.run_launcher import LAUNCHED_BY_TAG, PRESTARTED
from llm_twin_features.settings import Settings

from ..conftest import SAMPLE_CORPUS

UPDATED = "566bf9d7-c55a-45f8-91a6-e55e9b9b1325"
DELETED = "857ce06b-f9a2-4be1-b55c-ca5db3c7b88e"
TIMEOUT = 180


def run_cli(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(list(argv)) == 0
    return out.getvalue()


def wait_until_applied(query: str, word: str, cleaned: int, since: float, log) -> tuple[dict, dict]:
    """Until one of the top 3 posts for `query` contains `word` and posts are in sync with
    `cleaned` points; that hit and the posts' status."""
    deadline = since + TIMEOUT
    while time.monotonic() < deadline:
        status = {
            row["type"]: row for row in map(json.loads, run_cli("status", "--json").splitlines())
        }
        found = run_cli("search", query, "--type", "posts", "--json", "--limit", "3")
        hits = [hit for hit in map(json.loads, found.splitlines()) if word in hit["text"]]
        posts = status["posts"]
        if hits and posts["cleaned"] == cleaned and posts["in_sync"]:
            return hits[0], posts
        time.sleep(1)
    pytest.fail(f"{word!r} not applied within {TIMEOUT} s; see {log.read_text()[-3000:]}")


def prestarted_processes(dagster_home) -> list[psutil.Process]:
    """The run processes that the stack's launcher started (ready or running)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "llm_twin_features.runtime.run_worker" in (process.info["cmdline"] or []) and (
                process.environ().get("DAGSTER_HOME") == str(dagster_home)
            ):
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.mark.e2e
def test_update_and_delete_reach_search_and_status(data_dir, broker, tmp_path, monkeypatch):
    run_cli("ingest", "--no-publish", str(SAMPLE_CORPUS))
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # the CLI backfill uses the stack's instance
    monkeypatch.setenv("AUDIT_CRON", "0 0 1 1 *")  # no scheduled audit run in the way
    (home / "dagster.yaml").write_text(REPO_DAGSTER_YAML.read_text())
    settings = Settings()
    log_path = tmp_path / "stack.log"
    with open(log_path, "w") as log:
        stack = LocalStack(settings, home, ui_port=None, model_port=free_port(), log=log)
        with stack:
            # The first batch: the whole posts partition, as a warehouse-wide backfill would.
            with contextlib.redirect_stdout(io.StringIO()):
                cli.main(["backfill", "--type", "posts"])

            from llm_twin_features.cli.common import warehouse_of as _warehouse

            with _warehouse(settings) as warehouse:
                post = warehouse.documents("posts").get(UPDATED)
            text = post["content"]["text"] + "\n\nPostscript: the axolotl benchmark is out."
            with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as handle:
                handle.write(json.dumps({**post, "type": "posts", "content": {"text": text}}))
            published = time.monotonic()
            run_cli("ingest", handle.name)
            run_cli("delete", DELETED, "--type", "posts")

            top, posts = wait_until_applied(
                "axolotl benchmark postscript", "axolotl", cleaned=29, since=published, log=log_path
            )
            assert top["document_id"] == UPDATED
            assert posts["warehouse"] == 31 and posts["orphans"] == 0

            # Once the first event run has gone, the next one's process is already waiting.
            text += "\n\nSecond postscript: the narwhal results."
            with open(handle.name, "w") as rewritten:
                rewritten.write(json.dumps({**post, "type": "posts", "content": {"text": text}}))
            published = time.monotonic()
            run_cli("ingest", handle.name)
            top, posts = wait_until_applied(
                "narwhal results second postscript",
                "narwhal",
                cleaned=29,
                since=published,
                log=log_path,
            )
            assert top["document_id"] == UPDATED

            with dg.DagsterInstance.from_config(str(home)) as instance:
                # The data is searchable before its run has recorded its end.
                deadline = time.monotonic() + 30
                while True:
                    runs = instance.get_runs(dg.RunsFilter(tags={"llm_twin/trigger": "events"}))
                    if runs[0].is_finished or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                queued = [
                    run.run_id
                    for run in runs
                    if instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_ENQUEUED)
                ]
            # Nothing else was running: the event runs started at once (run_coordinator.py),
            # the last one in a process started ahead of time (run_launcher.py).
            assert runs and not queued
            assert runs[0].tags.get(LAUNCHED_BY_TAG) == PRESTARTED, runs[0].tags
            assert runs[0].status == dg.DagsterRunStatus.SUCCESS
            processes = list(stack.processes)
            workers = prestarted_processes(home)
            assert workers  # the one waiting for the next run
    assert all(p.poll() is not None for p in processes)  # stopped with SIGINT
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert "warehouse_events_sensor" in log_path.read_text()
