"""Sharded backfills: a partition split into runs over stable shards of its document ids
gives exactly the features of one whole-partition run, removes vanished documents per shard,
and a shard that was killed is run again alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llm_twin_features.cli.common import audits, feature_store_of, warehouse_of
from llm_twin_features.domain.shards import Shard
from llm_twin_features.settings import Settings
from llm_twin_features.stores.feature_store import cleaned_collection, vector_collection

from ..conftest import SAMPLE_CORPUS

COMMAND = [sys.executable, "-m", "llm_twin_features.cli"]
TYPE = "repositories"


def env_of(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "LLM_TWIN_DATA_DIR": str(data_dir), "DAGSTER_HOME": str(data_dir / "h")}
    env.pop("EMBEDDING_SERVICE_URL", None)
    return env


def cli(data_dir: Path, *argv: str) -> str:
    result = subprocess.run([*COMMAND, *argv], env=env_of(data_dir), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def snapshot(data_dir: Path) -> dict[str, dict]:
    """Every point of the type's two collections: payload, dense and sparse vectors."""
    points: dict[str, dict] = {}
    with feature_store_of(Settings(data_dir=data_dir)) as store:
        for collection in (cleaned_collection(TYPE), vector_collection(TYPE)):
            for record in store.points(collection, with_vectors=True):
                vectors = record.vector if isinstance(record.vector, dict) else {}
                sparse = vectors.get("bm25")
                points[f"{collection}/{record.id}"] = {
                    "payload": record.payload,
                    "dense": vectors.get(""),
                    "sparse": (sparse.indices, sparse.values) if sparse else None,
                }
    return points


def test_shards_give_the_points_of_a_whole_run(tmp_path: Path):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    for data_dir in (whole, sharded):
        cli(data_dir, "ingest", "--no-publish", str(SAMPLE_CORPUS))
    cli(whole, "backfill", "--type", TYPE)
    output = cli(sharded, "backfill", "--type", TYPE, "--shards", "3")
    for index in range(3):
        assert f"[{index + 1}/3] {TYPE} shard {index}/3: done in" in output

    expected, got = snapshot(whole), snapshot(sharded)
    assert sorted(got) == sorted(expected) and len(got) > 13
    for key, point in expected.items():
        assert got[key]["payload"] == point["payload"], key
        assert got[key]["sparse"] == point["sparse"], key
        if point["dense"] is not None:  # embedded in other batches: float noise only
            assert np.allclose(got[key]["dense"], point["dense"], atol=1e-5), key


def test_a_shard_removes_its_vanished_documents_and_a_killed_shard_runs_again_alone(
    tmp_path: Path,
):
    data_dir = tmp_path / "data"
    cli(data_dir, "ingest", "--no-publish", str(SAMPLE_CORPUS))
    cli(data_dir, "backfill", "--type", TYPE, "--shards", "3")
    with warehouse_of(Settings(data_dir=data_dir)) as warehouse:
        documents = list(warehouse.documents(TYPE).find())
    valid = [d for d in documents if isinstance(d.get("content"), dict) and d["content"]]
    gone = valid[0]["_id"]
    shard = next(s for s in Shard.all_of(3) if s.holds(gone))

    # A document deleted from the warehouse: its shard's run removes its features.
    cli(data_dir, "delete", "--no-publish", "--type", TYPE, gone)
    output = cli(data_dir, "backfill", "--type", TYPE, "--shard", str(shard))
    assert f"shard {shard}: done in" in output
    assert all(p["payload"]["document_id"] != gone for p in snapshot(data_dir).values())
    assert "False" not in cli(data_dir, "audit", "--type", TYPE)

    # Every document edited, then a sharded backfill killed while its second shard runs.
    edited = tmp_path / "edited.jsonl"
    rows = [
        {**d, "type": TYPE, "content": {**d["content"], "NOTES.md": f"Edited {d['_id']}."}}
        for d in valid[1:]
    ]
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli(data_dir, "ingest", "--no-publish", str(edited))
    backfill = subprocess.Popen(
        [*COMMAND, "backfill", "--type", TYPE, "--shards", "3"],
        env=env_of(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert backfill.stdout is not None
    deadline = time.monotonic() + 300
    for line in backfill.stdout:
        assert time.monotonic() < deadline
        if line.startswith("[2/3]") and "running" in line:
            backfill.kill()
            break
    backfill.wait(timeout=60)

    # Shard 0 finished before the kill: what is behind is in the other shards only.
    (report,) = audits(Settings(data_dir=data_dir), {TYPE: None})
    assert report.drifted_ids
    assert not any(Shard(0, 3).holds(i) for i in report.drifted_ids)
    for index in (1, 2):  # each run again alone
        output = cli(data_dir, "backfill", "--type", TYPE, "--shard", f"{index}/3")
        assert f"shard {index}/3: done in" in output and "[1/1]" in output
    assert "False" not in cli(data_dir, "audit", "--type", TYPE)
