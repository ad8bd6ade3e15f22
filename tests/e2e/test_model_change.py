"""Blue-green re-embedding: the embedding model changes while change events flow.

The second model is the bundled MiniLM with a fixed projection to 128 dimensions (built
here), so a query embedded by the wrong model for a collection cannot go unnoticed: Qdrant
rejects a vector of the wrong size. Must hold: search keeps answering from the old model's
generation (every hit of one model) while the new one is built by a sharded backfill with
events in between; a delete reaches search at once; the alias switches only when the new
generation's audit is clean; then every edit, insert and delete made during the build is in
search, the audit is clean, and the old generation is kept until `generations --prune`.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import dagster as dg
import pytest

from llm_twin_features import cli
from llm_twin_features.definitions import build_definitions
from llm_twin_features.defs.assets import scoped_run_config
from llm_twin_features.defs.jobs import FEATURE_PIPELINE_JOB
from llm_twin_features.domain.embedding import BUNDLED_MODEL, resolve_model_path
from llm_twin_features.settings import Settings
from llm_twin_features.stores.feature_store import (
    generation_collection,
    open_feature_store,
    vector_collection,
)

from ..conftest import SAMPLE_CORPUS
from .test_faults import SensorLoop, queue_depths

TYPE = "posts"
EDIT_WORD = "Zanzibarquokka"
NEW_WORD = "Quetzalpangolin"


def build_projected_model(target: Path) -> Path:
    """MiniLM followed by a fixed random 384 -> 128 projection: another model, another size."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    base = SentenceTransformer(resolve_model_path(BUNDLED_MODEL), local_files_only=True)
    torch.manual_seed(0)
    projection = Dense(384, 128, bias=False, activation_function=torch.nn.Identity())
    SentenceTransformer(modules=[base[0], base[1], projection, Normalize()]).save(str(target))
    return target


def run_cli(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(list(argv)) == 0
    return out.getvalue()


def search(query: str) -> list[dict]:
    """The CLI's hits for `query` (it fails the test if the search fails)."""
    output = run_cli("search", query, "--type", TYPE, "--json", "--limit", "5")
    return [json.loads(line) for line in output.splitlines()]


def serving_models(data_dir: Path) -> tuple[str | None, set[str]]:
    """The collection `vector_posts` names, and the models of all its points."""
    store = open_feature_store(None, None, data_dir)
    try:
        alias = vector_collection(TYPE)
        return store.aliases().get(alias), {
            (p.payload or {}).get("model_id", "") for p in store.points(alias)
        }
    finally:
        store.close()


def write_jsonl(path: Path, documents: list[dict]) -> str:
    path.write_text("".join(json.dumps(d) + "\n" for d in documents))
    return str(path)


def test_a_model_change_builds_beside_search_and_switches_when_complete(
    data_dir: Path, broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    model_b = str(build_projected_model(tmp_path / "minilm-128"))
    posts = [
        d
        for d in map(json.loads, SAMPLE_CORPUS.read_text().splitlines())
        if d.get("type") == TYPE and "platform" in d
    ]
    run_cli("ingest", "--no-publish", write_jsonl(tmp_path / "posts.jsonl", posts))
    old = generation_collection(TYPE, BUNDLED_MODEL)
    new = generation_collection(TYPE, model_b)

    with dg.instance_for_test() as instance:

        def backfill(shard: str | None = None) -> None:
            """A run of the definitions as loaded now (a model change restarts them)."""
            job = build_definitions().resolve_job_def(FEATURE_PIPELINE_JOB)
            config = scoped_run_config(None, shard=shard).to_config_dict()
            result = job.execute_in_process(
                instance=instance, partition_key=TYPE, run_config={"ops": config["ops"]}
            )
            assert result.success

        backfill()
        assert serving_models(data_dir) == (old, {BUNDLED_MODEL})
        assert search("orchestration")
        valid = json.loads(run_cli("audit", "--type", TYPE, "--json"))["cleaned_points"]

        # The model changes: search still reads the old generation, with the old model.
        monkeypatch.setenv("EMBEDDING_MODEL", model_b)
        loop = SensorLoop(instance)
        edited, deleted = posts[0], posts[1]
        backfill(shard="0/2")  # half of the new generation
        assert serving_models(data_dir) == (old, {BUNDLED_MODEL})
        assert {hit["document_id"] for hit in search("orchestration")}

        # Change events mid-build: an edit, a delete and a new post, each a run of its own.
        text = f"{EDIT_WORD} edited this post while the model changed."
        run_cli(
            "ingest",
            write_jsonl(tmp_path / "edit.jsonl", [{**edited, "content": {"text": text}}]),
        )
        run_cli("delete", "--type", TYPE, deleted["_id"])
        inserted = {
            **edited,
            "_id": "11111111-2222-3333-4444-555555555555",
            "content": {"text": f"{NEW_WORD} arrived during the re-embedding."},
        }
        run_cli("ingest", write_jsonl(tmp_path / "insert.jsonl", [inserted]))
        for _ in range(30):
            loop.step()
            if queue_depths(broker) == (0, 0) and loop.runs >= 1:
                break
        assert queue_depths(broker) == (0, 0) and loop.runs >= 1

        # Still the old generation, of one model; the delete has left it, and no search fails.
        serving, models = serving_models(data_dir)
        assert (serving, models) == (old, {BUNDLED_MODEL})
        hits = search("edited this post while the model changed")
        assert deleted["_id"] not in {hit["document_id"] for hit in search(deleted["_id"])}
        assert all(EDIT_WORD not in hit["text"] for hit in hits)  # comes with the switch
        generations = [json.loads(r) for r in run_cli("generations", "--json").splitlines()]
        roles = {(g["collection"], g["role"]) for g in generations if g["type"] == TYPE}
        assert roles == {(old, "serving"), (new, "building")}

        backfill(shard="1/2")  # completes the new generation: its audit is clean, it switches
        assert serving_models(data_dir) == (new, {model_b})
        edited_hits = search(f"{EDIT_WORD} edited this post")
        assert edited_hits[0]["document_id"] == edited["_id"]
        assert EDIT_WORD in edited_hits[0]["text"]
        assert search(NEW_WORD)[0]["document_id"] == inserted["_id"]
        assert deleted["_id"] not in {h["document_id"] for h in search("orchestration")}

        audit = json.loads(run_cli("audit", "--type", TYPE, "--json"))
        assert audit["in_sync"] and audit["cleaned_points"] == valid  # one deleted, one new
        generations = [json.loads(r) for r in run_cli("generations", "--json").splitlines()]
        assert {(g["collection"], g["role"]) for g in generations if g["type"] == TYPE} == {
            (new, "serving"),
            (old, "retired"),
        }
        assert f"removed retired generation {old}" in run_cli(
            "generations", "--type", TYPE, "--prune"
        )
        store = open_feature_store(None, None, Settings().resolved_data_dir)
        try:
            assert [c for c in store.collections() if c.startswith("vector_posts")] == [new]
        finally:
            store.close()
