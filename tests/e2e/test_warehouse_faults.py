"""The embedded warehouse under faults and hostile input (issue 9, points 1-4 and 7): SIGKILL
during an update, two writers of the same ids, documents that used to poison their type,
bad lines in a JSONL file, ids that changed silently, and a full disk.

Everything is real: the CLI runs as a child process on a montydb folder (SQLite files), the
kills are real SIGKILLs, and the full disk is a real tmpfs filled to the last byte.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_twin_features import cli
from llm_twin_features.domain.validation import UnreadableDocument
from llm_twin_features.pipeline.stages import ingest_raw
from llm_twin_features.stores.warehouse import open_warehouse

CLI = [sys.executable, "-m", "llm_twin_features.cli"]


def cli_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MONGO_URI", "QDRANT_URL")}
    return {**env, "LLM_TWIN_DATA_DIR": str(data_dir), "DAGSTER_HOME": str(data_dir / "home")}


def post(entry_id: str, text: str, **extra) -> dict:
    return {
        "type": "posts",
        "_id": entry_id,
        "platform": "linkedin",
        "author_id": "a",
        "content": {"text": text},
        **extra,
    }


def write_jsonl(path: Path, documents: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in documents))
    return path


def stored_posts(data_dir: Path) -> dict[str, str]:
    """id -> text of every post, read straight from the SQLite file, duplicates counted."""
    path = data_dir / "warehouse" / "twin" / "posts.collection"
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT k, v FROM documents").fetchall()
    documents = [json.loads(v) for _, v in rows]
    ids = [d["_id"] for d in documents]
    assert len(ids) == len(set(ids)), "a document is stored twice"
    return {d["_id"]: d["content"]["text"] for d in documents}


# --- 1. atomic writes --------------------------------------------------------------------------


def test_sigkill_at_random_points_of_an_update_loses_no_document(data_dir: Path, tmp_path: Path):
    """20 updates of 100 existing documents, each SIGKILLed at a random point: half at a
    random time after start, half a random 0-40 ms after the collection's files start to
    change (inside the write). After each kill every document is present, in its old or
    its new version, and none twice."""
    env = cli_env(data_dir)
    ids = [f"p{i:03d}" for i in range(100)]
    padding = "lorem ipsum " * 2_000  # ~24 KB a document: the write takes a while
    original = write_jsonl(tmp_path / "v0.jsonl", [post(i, f"v0 {padding}") for i in ids])
    subprocess.run([*CLI, "ingest", "--no-publish", str(original)], env=env, check=True)
    collection = data_dir / "warehouse" / "twin" / "posts.collection"
    files = [collection, collection.with_name(collection.name + "-wal")]

    def signature() -> tuple:
        return tuple(
            (f.stat().st_mtime_ns, f.stat().st_size) if f.exists() else None for f in files
        )

    rng = random.Random(9)
    outcomes = {"killed": 0, "finished": 0, "updated": 0}
    for round_number in range(1, 21):
        update = write_jsonl(
            tmp_path / f"v{round_number}.jsonl",
            [post(i, f"v{round_number} {padding}") for i in ids],
        )
        before = signature()
        process = subprocess.Popen(
            [*CLI, "ingest", "--no-publish", str(update)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if round_number % 2:
            time.sleep(rng.uniform(0.0, 2.5))
        else:
            deadline = time.monotonic() + 30
            while signature() == before and process.poll() is None:
                assert time.monotonic() < deadline, "the ingest never wrote"
                time.sleep(0.0005)
            time.sleep(rng.uniform(0.0, 0.04))
        process.send_signal(signal.SIGKILL)
        outcomes["finished" if process.wait() == 0 else "killed"] += 1

        texts = stored_posts(data_dir)
        assert sorted(texts) == ids, f"round {round_number}: {100 - len(texts)} posts lost"
        versions = {t.split(" ", 1)[0] for t in texts.values()}
        assert versions <= {f"v{n}" for n in range(round_number + 1)}
        outcomes["updated"] += versions == {f"v{round_number}"}
    print(f"FAULT-FIGURES sigkill during ingest: {outcomes}")
    assert outcomes["killed"] >= 10  # the kills did land while the command ran


def test_two_writers_of_the_same_ids_both_succeed_and_the_last_write_wins(
    data_dir: Path, tmp_path: Path
):
    env = cli_env(data_dir)
    ids = [f"p{i:03d}" for i in range(200)]
    sources = [
        write_jsonl(tmp_path / f"{name}.jsonl", [post(i, f"{name} " + "x" * 20_000) for i in ids])
        for name in ("first", "second")
    ]
    for _ in range(5):
        writers = [
            subprocess.Popen(
                [*CLI, "ingest", "--no-publish", str(s)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for s in sources
        ]
        results = [(*w.communicate(timeout=120), w.returncode) for w in writers]
        for _, err, code in results:
            assert code == 0, err
        texts = stored_posts(data_dir)
        assert sorted(texts) == ids
        # Each write is one transaction: one writer's batch is entirely on top.
        assert len({t.split(" ", 1)[0] for t in texts.values()}) == 1


def test_a_write_to_a_new_collection_waits_for_another_writers_lock(data_dir: Path):
    """Another connection holds a write transaction on a new collection's file (the first
    of two writers to create it). SQLite answers the switch to WAL mode with `database is
    locked` at once, without waiting as it does for writes: the test above failed so in one
    CI run. Must hold: the write waits for the lock like any other write, then succeeds."""
    import threading

    path = data_dir / "warehouse" / "twin" / "posts.collection"
    path.parent.mkdir(parents=True)
    first = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    first.execute("CREATE TABLE documents(k text NOT NULL, v text NOT NULL, PRIMARY KEY(k))")
    first.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.5, lambda: first.execute("COMMIT"))
    release.start()
    warehouse = open_warehouse(None, "twin", "twin_features", data_dir)
    try:
        warehouse.documents("posts").replace_many([post("p1", "after the lock")])
    finally:
        release.join()
        first.close()
        warehouse.close()
    assert stored_posts(data_dir) == {"p1": "after the lock"}


# --- 2. documents that poisoned their type --------------------------------------------------


HOSTILE = [
    post("date", "a date", meta={"$date": "yesterday"}),
    post("regex", "a regex", meta={"$regex": "(("}),
    post("oid", "an oid", meta={"$oid": "not hex"}),
    post("binary", "binary", meta={"$binary": {"base64": "!!"}}),
    {**post("nested", "nested"), "content": {"text": "t", "x": {"$date": {"$numberLong": "x"}}}},
]


def test_extended_json_in_content_is_stored_as_data(data_dir: Path, tmp_path: Path, capsys):
    """Content holding `$`-operators is what the user gave: stored and read back as it is,
    and the type stays readable for every command."""
    source = write_jsonl(tmp_path / "hostile.jsonl", [*HOSTILE, post("plain", "plain post")])
    assert cli.main(["ingest", "--no-publish", str(source)]) == 0
    warehouse = open_warehouse(None, "twin", "twin_features", data_dir)
    try:
        stored = {d["_id"]: d for d in warehouse.documents("posts").find()}
        assert stored["date"]["meta"] == {"$date": "yesterday"}
        assert stored["regex"]["meta"] == {"$regex": "(("}
        assert len(stored) == 6
    finally:
        warehouse.close()
    # a later ingest, backfill, audit, status and delete of the type all work
    assert cli.main(["ingest", "--no-publish", str(source)]) == 0
    assert cli.main(["backfill", "--type", "posts"]) == 0
    assert cli.main(["audit", "--type", "posts"]) == 0
    capsys.readouterr()
    assert cli.main(["status", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    posts = next(r for r in rows if r["type"] == "posts")
    assert (posts["warehouse"], posts["cleaned"], posts["in_sync"]) == (6, 6, True)
    assert cli.main(["delete", "--no-publish", "--type", "posts", "date", "regex"]) == 0
    assert cli.main(["backfill", "--type", "posts"]) == 0
    assert cli.main(["audit", "--type", "posts"]) == 0


def corrupt_row(data_dir: Path, entry_id: str, value: bytes) -> None:
    """A row no JSON decoder reads, as a damaged file or a foreign writer leaves it."""
    path = data_dir / "warehouse" / "twin" / "posts.collection"
    with sqlite3.connect(path) as connection:
        connection.execute(
            "INSERT INTO documents(k, v) VALUES (?, ?)", (json.dumps(entry_id).encode(), value)
        )


def test_an_unreadable_stored_row_is_quarantined_and_the_rest_goes_on(data_dir: Path, tmp_path):
    source = write_jsonl(tmp_path / "posts.jsonl", [post(f"ok{i}", f"post {i}") for i in range(3)])
    assert cli.main(["ingest", "--no-publish", str(source)]) == 0
    corrupt_row(data_dir, "broken", b'{"platform": "x", "content": {"te')
    corrupt_row(data_dir, "latin1", b'{"content": {"text": "caf\xe9"}}')

    warehouse = open_warehouse(None, "twin", "twin_features", data_dir)
    try:
        documents = {d["_id"]: d for d in warehouse.documents("posts").find()}
        assert set(documents) == {"ok0", "ok1", "ok2", "broken", "latin1"}
        assert isinstance(documents["broken"], UnreadableDocument)
        report = ingest_raw(warehouse, "posts")
        assert report.upserted == 3
        assert set(report.quarantined) == {"broken", "latin1"}
        assert "stored document cannot be decoded" in report.quarantined["broken"]
        assert warehouse.raw_state("posts").ids() == {"ok0", "ok1", "ok2"}
    finally:
        warehouse.close()
    # another ingest of the type still works, and delete removes the bad rows
    assert cli.main(["ingest", "--no-publish", str(source)]) == 0
    assert cli.main(["delete", "--no-publish", "--type", "posts", "broken", "latin1"]) == 0
    assert set(stored_posts(data_dir)) == {"ok0", "ok1", "ok2"}


# --- 3. bad lines --------------------------------------------------------------------------------


def test_each_bad_line_is_reported_and_every_good_line_is_written(data_dir, tmp_path, capsys):
    good = [json.dumps(post(f"g{i}", f"good {i}")).encode() for i in range(3)]
    source = tmp_path / "mixed.jsonl"
    source.write_bytes(
        b"\xef\xbb\xbf"  # a UTF-8 byte-order mark before the first line
        + good[0]
        + b"\n"
        + json.dumps(post("latin", "x")).encode().replace(b'"x"', b'"caf\xe9"')
        + b"\n"
        + good[1]
        + b"\n"
        + b'{"type": "posts", "_id": "deep", "x": '
        + b"[" * 50_000
        + b"]" * 50_000
        + b"}\n"
        + b'{"type": "posts", "_id": "deep2", "x": '
        + b"[" * 500
        + b"]" * 500
        + b"}\n"
        + good[2]
        + b"\n"
    )
    assert cli.main(["ingest", "--no-publish", str(source)]) == 1
    err = capsys.readouterr().err
    assert f"{source}:2: not UTF-8: 'utf-8' codec can't decode byte 0xe9" in err
    assert f"{source}:4: nested deeper than 100 levels" in err
    assert f"{source}:5: nested deeper than 100 levels" in err
    assert f"{source}:1:" not in err
    assert set(stored_posts(data_dir)) == {"g0", "g1", "g2"}


# --- 4. ids --------------------------------------------------------------------------------------


def test_ids_are_kept_derived_or_refused_never_changed_silently(data_dir, tmp_path, capsys):
    oid = "5F1D7B3C9A2E4B6C8D0E1F2A"
    lines = [
        {k: v for k, v in post("", "no id at all").items() if k != "_id"},
        post(None, "null id"),
        post({"$oid": oid}, "extended json id"),
        post(0, "zero"),
        post("", "empty"),
        post(True, "true"),
        post({"$oid": "xyz"}, "bad oid"),
        post({"nested": 1}, "object"),
    ]
    source = write_jsonl(tmp_path / "ids.jsonl", lines)
    for _ in range(3):
        assert cli.main(["ingest", "--no-publish", str(source)]) == 1
    err = capsys.readouterr().err
    for line in (4, 5, 6, 8):
        assert f"{source}:{line}: invalid _id" in err
    assert f"{source}:7: invalid _id: $oid must be 24 hexadecimal digits" in err
    texts = stored_posts(data_dir)
    assert len(texts) == 3  # three ingests of the same file: the same three documents
    assert texts[oid.lower()] == "extended json id"
    derived = sorted(i for i, t in texts.items() if t in ("no id at all", "null id"))
    assert len(derived) == 2 and all(len(i) == 36 for i in derived)  # uuid5 of type + content


def test_top_level_dollar_fields_are_refused(data_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "op.jsonl", [post("p", "x", **{"$set": {"a": 1}})])
    assert cli.main(["ingest", "--no-publish", str(source)]) == 1
    assert "field names may not start with '$' (MongoDB): $set" in capsys.readouterr().err


# --- 7. a full disk --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 48 MB filesystem (tmpfs); needs root, as on the CI machine."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> None:
    """Writes until the filesystem has no byte left (big blocks first, then small ones)."""
    descriptor = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for block in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(descriptor, b"\0" * block)
            except OSError:
                continue
    finally:
        os.close(descriptor)


def test_a_full_disk_gives_one_line_per_command_and_writes_nothing(small_disk, tmp_path):
    data_dir = small_disk / "data"
    env = cli_env(data_dir)
    first = write_jsonl(tmp_path / "a.jsonl", [post(f"p{i}", f"post {i}") for i in range(5)])
    subprocess.run([*CLI, "ingest", "--no-publish", str(first)], env=env, check=True)
    subprocess.run([*CLI, "backfill", "--type", "posts"], env=env, check=True, capture_output=True)
    before = stored_posts(data_dir)
    fill(small_disk)

    update = write_jsonl(tmp_path / "b.jsonl", [post(f"p{i}", "y" * 20_000) for i in range(50)])
    commands = {
        "ingest": ["ingest", "--no-publish", str(update)],
        "status": ["status"],
        "audit": ["audit"],
        "search": ["search", "hello"],
        "delete": ["delete", "--no-publish", "--type", "posts", "p1"],
        "backfill": ["backfill", "--type", "posts"],
    }
    for name, argv in commands.items():
        result = subprocess.run([*CLI, *argv], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0, name
        assert "Traceback" not in result.stderr, f"{name}: {result.stderr}"
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, f"{name}: {result.stderr}"
        assert str(data_dir) in errors[0] and "disk" in errors[0], f"{name}: {errors[0]}"
    assert stored_posts(data_dir) == before  # nothing half-written
