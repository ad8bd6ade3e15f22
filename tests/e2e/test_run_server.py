"""The run server (cli/run_server.py): a backfill without the laptop stack leaves it behind,
and the next commands' runs execute there, recorded in the same Dagster instance, while any
other process that needs the local feature store still gets it. Killed during a run, it loses
nothing: the command runs the same runs itself. It serves only its own configuration and code,
and exits when idle."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest

from llm_twin_features.cli.common import feature_store_of, warehouse_of
from llm_twin_features.cli.run_server import server_file, stop_run_server
from llm_twin_features.runtime.dead_runs import PID_TAG, START_TAG, owner_tags
from llm_twin_features.settings import Settings
from llm_twin_features.stores.feature_store import holder_file, vector_collection

from ..conftest import SAMPLE_CORPUS

COMMAND = [sys.executable, "-m", "llm_twin_features.cli"]
THROUGH_SERVER = "through the run server"


class Cli:
    def __init__(self, data_dir: Path, home: Path, idle_seconds: float) -> None:
        self.settings = Settings(data_dir=data_dir)
        self.home = home
        self.env = {
            **os.environ,
            "LLM_TWIN_DATA_DIR": str(data_dir),
            "DAGSTER_HOME": str(home),
            "RUN_SERVER_IDLE_SECONDS": str(idle_seconds),
        }
        self.env.pop("EMBEDDING_SERVICE_URL", None)

    def __call__(self, *argv: str, **env: str) -> str:
        result = subprocess.run(
            [*COMMAND, *argv], env={**self.env, **env}, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    def server_pid(self, timeout: float = 30, other_than: int | None = None) -> int:
        """The pid of the data dir's run server, once published (one other than `other_than`:
        a replacement the last command started)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid = int(json.loads(server_file(self.settings).read_text())["pid"])
                if pid != other_than and alive(pid):
                    return pid
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        raise AssertionError("no run server was published")

    def runs(self) -> list[dg.DagsterRun]:
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            return list(instance.get_runs())


@pytest.fixture
def cli(data_dir: Path, tmp_path: Path):
    cli = Cli(data_dir, tmp_path / "home", idle_seconds=120)
    yield cli
    try:  # no server outlives its test
        pid = int(json.loads(server_file(cli.settings).read_text())["pid"])
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, KeyError):
        pass


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs after {timeout} s"
        time.sleep(0.1)


def long_paragraphs(first: str) -> str:
    """`first`, then 25 paragraphs of 120 random words: about 20 new chunks per document."""
    words = ("vector", "warehouse", "kettle", "sparrow", "owl", "lineage", "quantum", "chunk")
    paragraphs = (" ".join(random.choice(words) for _ in range(120)) for _ in range(25))
    return "\n\n".join([first, *paragraphs])


def wait_for_new_run(cli: Cli, known: set[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(run.run_id not in known for run in cli.runs()):
        assert time.monotonic() < deadline, f"no new run within {timeout} s"
        time.sleep(0.05)


def edit_articles(settings: Settings, count: int, text: str) -> list[str]:
    """Appends a paragraph with `text` to the first `count` valid articles; their ids."""
    with warehouse_of(settings) as warehouse:
        articles = warehouse.documents("articles")
        documents = [
            document
            for document in map(articles.get, sorted(articles.ids()))
            if isinstance(document.get("content", {}).get("Content"), str)
            and len(document["content"]["Content"]) > 200
        ][:count]
        for document in documents:
            document["content"]["Content"] += f"\n\n{text}"
        articles.replace_many(documents)
    return [str(document["_id"]) for document in documents]


def chunk_texts(settings: Settings, data_type: str) -> dict[str, str]:
    """document id -> its chunks' text in the feature store (opened from this process)."""
    texts: dict[str, str] = {}
    with feature_store_of(settings) as store:
        for point in store.points(vector_collection(data_type)):
            payload = point.payload or {}
            document_id = str(payload["document_id"])
            texts[document_id] = texts.get(document_id, "") + str(payload["content"])
    return texts


def test_a_backfill_leaves_a_run_server_that_takes_the_next_commands_runs(cli):
    cli("ingest", "--no-publish", str(SAMPLE_CORPUS))
    first = cli("backfill")
    assert THROUGH_SERVER not in first
    pid = cli.server_pid()

    # An edit: the run executes in the server, recorded in the command's Dagster instance.
    (article,) = edit_articles(cli.settings, 1, "Kettles of sparrows index the warehouse.")
    output = cli("backfill", "--type", "articles", "--ids", article, PYTHONPROFILEIMPORTTIME="1")
    assert THROUGH_SERVER in output and re.search(r"\b1 embedded", output)
    # The command itself imports none of what the server has ready.
    imported = re.findall(r"^import time:.*\|\s+(\S+)$", output, re.MULTILINE)
    assert "llm_twin_features.cli.run_server" in imported
    assert not {"dagster", "qdrant_client", "torch"} & set(imported)
    run = cli.runs()[0]
    assert run.status == dg.DagsterRunStatus.SUCCESS and run.tags[PID_TAG] == str(pid)
    with dg.DagsterInstance.from_config(str(cli.home)) as instance:
        materialized = {
            record.asset_key.to_user_string()
            for record in instance.get_records_for_run(
                run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
            ).records
            if record.asset_key is not None
        }
    assert materialized == {
        "raw_documents",
        "cleaned_documents",
        "chunked_documents",
        "embedded_chunks",
    }

    # The server keeps the local feature store open between runs, and lets go of it for
    # another process: this one reads the edit, and `search` finds it.
    assert holder_file(cli.settings.resolved_data_dir).exists()
    started = time.monotonic()
    assert "Kettles of sparrows" in chunk_texts(cli.settings, "articles")[article]
    assert time.monotonic() - started < 5  # not the 10 min of waiting for the lock
    hit = cli("search", "kettles of sparrows", "--type", "articles", "--limit", "1", "--json")
    assert json.loads(hit.splitlines()[0])["document_id"] == article

    # Two commands at once: the second waits for the first's runs (about 500 chunks to embed),
    # then runs in the same server.
    with warehouse_of(cli.settings) as warehouse:
        post = sorted(warehouse.documents("posts").ids())[0]
    cli("delete", "--no-publish", "--type", "posts", post)
    ids = edit_articles(cli.settings, 22, long_paragraphs("Owls audit the vector store."))
    known = {run.run_id for run in cli.runs()}
    first: list[str] = []
    heavy = threading.Thread(
        target=lambda: first.append(cli("backfill", "--type", "articles", "--ids", *ids))
    )
    heavy.start()
    wait_for_new_run(cli, known)
    second = cli("backfill", "--type", "posts", "--ids", post)
    heavy.join()
    assert THROUGH_SERVER in first[0] and THROUGH_SERVER in second
    assert "waiting for the run server to finish another command's runs" in second
    assert post not in chunk_texts(cli.settings, "posts")
    texts = chunk_texts(cli.settings, "articles")
    assert all("Owls audit" in texts[entry_id] for entry_id in ids)
    assert cli.server_pid() == pid  # the same server all along
    assert "False" not in cli("audit")


def test_a_run_server_killed_during_a_run_loses_nothing(cli):
    """SIGKILL at a random point of the server's run: the command runs the runs itself (its
    own process releases the dead run's pool slot) and the store ends in sync."""
    cli("ingest", "--no-publish", str(SAMPLE_CORPUS))
    cli("backfill")
    pid = cli.server_pid()
    cli("backfill", "--type", "posts", "--force")  # the server is warm
    text = "A paragraph the killed run was embedding."
    ids = edit_articles(cli.settings, 22, long_paragraphs(text))
    known = {run.run_id for run in cli.runs()}

    def kill_during_the_run() -> None:
        wait_for_new_run(cli, known)
        time.sleep(random.uniform(0.0, 2.0))
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_during_the_run)
    killer.start()
    output = cli("backfill", "--type", "articles", "--ids", *ids)
    killer.join()
    assert not alive(pid)
    assert THROUGH_SERVER in output and "the run server stopped during the runs" in output
    texts = chunk_texts(cli.settings, "articles")
    assert all(text in texts[entry_id] for entry_id in ids)
    assert "False" not in cli("audit")


def test_the_run_server_serves_only_its_own_configuration_and_code(cli, tmp_path):
    # Every process of the test imports a module of the test's own (through sitecustomize),
    # so that a source edit can be made without touching the project's files.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import run_server_probe  # noqa: F401\n")
    probe = site / "run_server_probe.py"
    probe.write_text('"""Imported by every process of the test."""\n')
    cli.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    cli("ingest", "--no-publish", str(SAMPLE_CORPUS))
    cli("backfill", "--type", "posts")
    pid = cli.server_pid()
    with warehouse_of(cli.settings) as warehouse:
        post = sorted(warehouse.documents("posts").ids())[0]

    # Another configuration: declined, run here; the server it started replaces the old one,
    # which exits.
    output = cli("backfill", "--type", "posts", "--ids", post, MAX_DOCUMENT_CHARS="150000")
    assert "the command's configuration differs" in output and THROUGH_SERVER not in output
    replacement = cli.server_pid(other_than=pid)
    wait_gone(pid)

    # A source file it imported, edited after it started (its mtime is enough): declined,
    # and it exits.
    os.utime(probe)
    output = cli("backfill", "--type", "posts", "--ids", post, MAX_DOCUMENT_CHARS="150000")
    assert "run_server_probe.py was edited since it started" in output
    assert THROUGH_SERVER not in output
    wait_gone(replacement)


def test_an_idle_run_server_exits_and_unpublishes_itself(data_dir, tmp_path):
    cli = Cli(data_dir, tmp_path / "home", idle_seconds=2)
    cli("ingest", "--no-publish", str(SAMPLE_CORPUS))
    cli("backfill", "--type", "posts")
    wait_gone(cli.server_pid(), timeout=60)
    assert not server_file(cli.settings).exists()
    assert not holder_file(cli.settings.resolved_data_dir).exists()
    assert (
        "idle for 2 s; exiting" in (cli.settings.resolved_data_dir / "run_server.log").read_text()
    )
    # Turned off: nothing is left behind.
    cli("backfill", "--type", "posts", "--force", RUN_SERVER_IDLE_SECONDS="0")
    time.sleep(1)
    assert not server_file(cli.settings).exists()

    # Stopped (as `dev` does before starting the stack): it closes the store and unpublishes.
    cli("backfill", "--type", "posts", "--force")
    pid = cli.server_pid()
    assert stop_run_server(cli.settings) and not alive(pid)
    assert not server_file(cli.settings).exists()
    assert not holder_file(cli.settings.resolved_data_dir).exists()
    assert not stop_run_server(cli.settings)


def test_a_dead_servers_pid_taken_by_another_process_is_left_alone(data_dir):
    """A run server killed outright leaves its file behind; if its pid now belongs to another
    process, no command takes that process for the server, and `dev` does not stop it."""
    settings = Settings(data_dir=data_dir)
    data_dir.mkdir(parents=True)
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        owner = owner_tags(stranger.pid)
        owner[START_TAG] = str(int(owner[START_TAG]) - 1)  # the dead server's start time
        published = {"pid": stranger.pid, "owner": owner, "port": 1, "token": "t"}
        server_file(settings).write_text(json.dumps(published))
        assert not stop_run_server(settings)
        assert stranger.poll() is None  # not signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_a_command_gone_before_its_runs_start_never_has_them_run(cli):
    """A command that gave up waiting (it then runs its runs itself) has them not run by the
    server as well: the server runs a request only once its command answers `go`."""
    cli("ingest", "--no-publish", str(SAMPLE_CORPUS))
    cli("backfill", "--type", "posts")
    cli.server_pid()
    published = json.loads(server_file(cli.settings).read_text())
    settings = Settings(data_dir=cli.settings.data_dir, run_server_idle_seconds=120)
    request = {
        "token": published["token"],
        "request": "run",
        "fingerprint": settings.fingerprint(),
        "dagster_home": str(cli.home.resolve()),
        "runs": [{"data_type": "posts", "document_ids": None, "shard": None}],
        "trigger": "gone",
        "force": True,
    }
    with socket.create_connection(("127.0.0.1", int(published["port"]))) as gone:
        gone.sendall(json.dumps(request).encode() + b"\n")  # and leaves without an answer
    # A command after it: the server takes requests one at a time, so the one that left was
    # decided before this one runs.
    assert THROUGH_SERVER in cli("backfill", "--type", "posts", "--force")
    assert [run.tags["llm_twin/trigger"] for run in cli.runs()].count("gone") == 0
