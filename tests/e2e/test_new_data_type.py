"""A fourth data type, declared in this test alone, goes end to end: ingest, backfill,
search, audit and status. Nothing else in the project names it: partitions, event
validation, the warehouse collection, the stage dispatch, the payloads and the CLI's
choices all derive from its one `DataTypeSpec`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Each CLI call is a process that declares the type, then runs the command.
DECLARE_AND_RUN = """
import sys

from llm_twin_features.domain.data_types import DataTypeSpec, register
from llm_twin_features.domain.models import RawDocument


class VideoDocument(RawDocument):
    platform: str
    link: str


register(
    DataTypeSpec(
        "videos",
        VideoDocument,
        description="Video transcripts.",
        metadata_fields=("platform", "link"),
    )
)

from llm_twin_features import cli

sys.exit(cli.main(sys.argv[1:]))
"""

VIDEOS = [
    {
        "type": "videos",
        "_id": f"v{i}",
        "platform": "youtube",
        "link": f"https://youtube.example/watch?v={i}",
        "author_id": "creator",
        "content": {"title": title, "transcript": transcript},
    }
    for i, (title, transcript) in enumerate(
        [
            ("Sourdough", "Feed the starter twice a day and keep the dough at room temperature."),
            ("Bicycles", "Adjust the rear derailleur limit screws before tuning cable tension."),
            ("Orbits", "A geostationary satellite circles the Earth once per sidereal day."),
        ]
    )
]


def run(data_dir: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MONGO_URI", "QDRANT_URL")}
    env.update(LLM_TWIN_DATA_DIR=str(data_dir), DAGSTER_HOME=str(data_dir / "home"))
    return subprocess.run(
        [sys.executable, "-c", DECLARE_AND_RUN, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_type_declared_once_runs_end_to_end(tmp_path: Path):
    data_dir = tmp_path / "data"
    source = tmp_path / "videos.jsonl"
    source.write_text("".join(json.dumps(v) + "\n" for v in VIDEOS))

    ingested = run(data_dir, "ingest", "--no-publish", str(source))
    assert ingested.returncode == 0, ingested.stderr
    assert "videos: 3" in ingested.stdout

    backfill = run(data_dir, "backfill", "--type", "videos")
    assert backfill.returncode == 0, backfill.stderr
    assert "videos: done" in backfill.stdout and "3 documents" in backfill.stdout

    found = run(data_dir, "search", "how do I tune a derailleur?", "--type", "videos", "--json")
    assert found.returncode == 0, found.stderr
    hits = [json.loads(line) for line in found.stdout.splitlines()]
    assert hits[0]["document_id"] == "v1"

    audited = run(data_dir, "audit", "--type", "videos", "--json")
    assert audited.returncode == 0, audited.stdout + audited.stderr
    (report,) = [json.loads(line) for line in audited.stdout.splitlines() if line.startswith("{")]
    assert report["in_sync"] is True

    status = run(data_dir, "status", "--json")
    rows = {r["type"]: r for r in map(json.loads, status.stdout.splitlines())}
    assert (rows["videos"]["warehouse"], rows["videos"]["cleaned"]) == (3, 3)
    assert rows["videos"]["in_sync"] and rows["posts"]["warehouse"] == 0

    # The payloads carry the declared metadata fields.
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(data_dir / "qdrant"))
    try:
        points, _ = client.scroll("vector_videos", limit=10)
        assert {p.payload["platform"] for p in points} == {"youtube"}
        assert all(p.payload["link"].startswith("https://youtube.example/") for p in points)
    finally:
        client.close()
