"""The command line on the embedded stores: ingest errors, publishing failures, backfill
progress and the Dagster instance it records runs in."""

import json
import os
import re
import subprocess
import sys
import time

import dagster as dg
import psutil

from llm_twin_features import cli
from llm_twin_features.stores.queue import EventInbox

from ..conftest import SAMPLE_CORPUS


def helper_server_processes(url: str) -> list[psutil.Process]:
    """The processes serving models on `url`'s port (a backfill's helper model server)."""
    port = url.rsplit(":", 1)[1]
    return [p for p in psutil.process_iter(["cmdline"]) if port in (p.info["cmdline"] or [])]


def test_ingest_reports_bad_lines_and_keeps_the_good_ones(data_dir, tmp_path, capsys):
    source = tmp_path / "crawl.jsonl"
    source.write_text(
        "\n".join(
            [
                json.dumps(
                    {
                        "type": "posts",
                        "_id": "p1",
                        "platform": "x",
                        "content": {"text": "hi"},
                        "author_id": "a",
                    }
                ),
                "{not json",
                json.dumps({"type": "users", "_id": "u1", "first_name": "Ada"}),
                "",
                json.dumps(
                    {
                        "type": "articles",
                        "platform": "medium",
                        "link": "l",
                        "content": {"Content": "body"},
                        "author_id": "a",
                    }
                ),
                "[1, 2]",
            ]
        )
    )
    assert cli.main(["ingest", "--no-publish", str(source)]) == 1
    out, err = capsys.readouterr()
    assert f"{source}:2: invalid JSON" in err
    assert f"{source}:3: unknown type 'users'" in err
    assert f"{source}:6: a line must be a JSON object" in err
    assert "ingested 2 documents (posts: 1, articles: 1, repositories: 0); 3 bad lines" in out

    from llm_twin_features.cli.common import warehouse_of as _warehouse
    from llm_twin_features.settings import Settings

    with _warehouse(Settings()) as warehouse:
        assert warehouse.documents("posts").ids() == {"p1"}
        (article,) = warehouse.documents("articles").find()
    assert len(article["_id"]) == 36  # an id is given when the line has none


def test_ingest_publishes_one_event_per_document(data_dir, broker, capsys):
    assert cli.main(["ingest", str(SAMPLE_CORPUS)]) == 0
    assert "published 67 change events" in capsys.readouterr().out
    with EventInbox(broker) as inbox:
        events = [json.loads(d.body) for d in inbox.drain(100, 5)]
    assert len(events) == 67 and {e["op"] for e in events} == {"insert"}
    assert {e["type"] for e in events} == {"posts", "articles", "repositories"}

    assert cli.main(["ingest", str(SAMPLE_CORPUS)]) == 0  # the same documents again
    with EventInbox(broker) as inbox:
        again = [json.loads(d.body) for d in inbox.drain(200, 5)]
    assert {e["op"] for e in again[67:]} == {"replace"}


def test_unreachable_broker_keeps_the_write_and_says_how_to_replay(data_dir, monkeypatch, capsys):
    monkeypatch.setenv("RABBITMQ_PORT", "1")
    assert cli.main(["ingest", str(SAMPLE_CORPUS)]) == 1
    captured = capsys.readouterr()
    assert "ingested 67 documents" in captured.out
    assert "RabbitMQ at amqp://127.0.0.1:1 unreachable" in captured.err
    assert "67 change events were NOT published; the warehouse write stands" in captured.err
    assert "llm-twin-features backfill" in captured.err

    assert cli.main(["delete", "nope", "--type", "posts"]) == 1
    assert "not in the warehouse: nope" in capsys.readouterr().err


def test_backfill_shows_progress_and_records_runs_in_dagster_home(data_dir, tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "LLM_TWIN_DATA_DIR": str(data_dir), "DAGSTER_HOME": str(home)}
    command = [sys.executable, "-m", "llm_twin_features.cli"]
    subprocess.run(
        [*command, "ingest", "--no-publish", str(SAMPLE_CORPUS)],
        env=env,
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        [*command, "backfill", "--type", "repositories"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[1/1] repositories: running feature_pipeline_job" in result.stdout
    assert "[1/1] repositories: done in" in result.stdout
    assert "13 documents, 1 quarantined" in result.stdout
    assert "embedded repositories:" in result.stderr  # the stage's progress lines
    # The model was loaded by a helper server meanwhile, the run embedded through it (no
    # fallback to a model of its own), and the helper is gone with the command.
    (helper,) = re.findall(r"loading the embedding model meanwhile, in (\S+)", result.stdout)
    assert "in this process instead" not in result.stderr
    assert not helper_server_processes(helper)
    assert (home / "dagster.yaml").exists()  # the laptop instance config was put in place
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        assert run.tags["dagster/partition"] == "repositories"
        assert run.tags["llm_twin/trigger"] == "cli-backfill"


def test_a_backfill_with_nothing_to_embed_loads_no_model(data_dir, tmp_path):
    """Unchanged features, or a deleted document, need no model: no helper model server."""
    env = {**os.environ, "LLM_TWIN_DATA_DIR": str(data_dir), "DAGSTER_HOME": str(tmp_path)}
    env.pop("EMBEDDING_SERVICE_URL", None)
    command = [sys.executable, "-m", "llm_twin_features.cli"]

    def run(*argv: str) -> str:
        result = subprocess.run([*command, *argv], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    run("ingest", "--no-publish", str(SAMPLE_CORPUS))
    assert "loading the embedding model meanwhile" in run("backfill", "--type", "posts")
    again = run("backfill", "--type", "posts", "--force")  # unchanged: run anyway
    assert "nothing to chunk or embed; no model needed" in again
    assert "loading the embedding model" not in again and "0 embedded" in again

    post = next(
        d
        for d in map(json.loads, SAMPLE_CORPUS.read_text().splitlines())
        if "platform" in d and d["type"] == "posts"
    )
    run("delete", "--no-publish", "--type", "posts", post["_id"])
    deleted = run("backfill", "--type", "posts", "--ids", post["_id"])
    assert "no model needed" in deleted
    assert subprocess.run([*command, "audit", "--type", "posts"], env=env).returncode == 0

    edited = tmp_path / "edited.jsonl"
    edited.write_text(json.dumps({**post, "content": {"text": "A brand new paragraph."}}) + "\n")
    run("ingest", "--no-publish", str(edited))
    assert "loading the embedding model meanwhile" in run(
        "backfill", "--type", "posts", "--ids", post["_id"]
    )


def test_asset_materialize_from_the_dagster_cli(data_dir, tmp_path):
    """The Dagster CLI's own backfill path works on the code location as well."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_twin_features.cli",
            "ingest",
            "--no-publish",
            str(SAMPLE_CORPUS),
        ],
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        [
            f"{sys.prefix}/bin/dagster",
            "asset",
            "materialize",
            "-m",
            "llm_twin_features.definitions",
            "--select",
            "raw_documents,cleaned_documents,chunked_documents,embedded_chunks",
            "--partition",
            "repositories",
        ],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"},  # a temporary instance
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RUN_SUCCESS" in result.stderr


def test_no_helper_model_server_when_one_is_configured_or_a_model_is_loaded(monkeypatch):
    from llm_twin_features.domain.embedding import BUNDLED_MODEL, load_local_model
    from llm_twin_features.runtime.local_stack import helper_model_server
    from llm_twin_features.settings import Settings

    with helper_model_server(Settings(embedding_service_url="http://models:8765")) as url:
        assert url is None
    load_local_model(BUNDLED_MODEL)
    monkeypatch.delenv("EMBEDDING_SERVICE_URL", raising=False)
    with helper_model_server(Settings()) as url:
        assert url is None
        assert "EMBEDDING_SERVICE_URL" not in os.environ


def test_the_helper_model_server_exits_when_its_backfill_is_killed(data_dir, tmp_path):
    env = {**os.environ, "LLM_TWIN_DATA_DIR": str(data_dir), "DAGSTER_HOME": str(tmp_path)}
    command = [sys.executable, "-m", "llm_twin_features.cli"]
    subprocess.run([*command, "ingest", "--no-publish", str(SAMPLE_CORPUS)], env=env, check=True)
    backfill = subprocess.Popen(
        [*command, "backfill"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    (helper,) = re.findall(r"meanwhile, in (\S+)", backfill.stdout.readline())
    backfill.kill()  # SIGKILL: no clean-up code of its own runs
    backfill.wait()
    deadline = time.monotonic() + 60
    while helper_server_processes(helper):
        assert time.monotonic() < deadline, "the helper model server outlived its backfill"
        time.sleep(0.2)
