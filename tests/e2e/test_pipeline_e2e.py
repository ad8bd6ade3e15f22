"""End to end on the real embedded stores and a Dagster test instance: ingest the sample
corpus, backfill every partition through Dagster, then change the warehouse and check that
each change, and only it, reaches the feature store.

The tests of this module share one backfilled corpus and run in file order; each leaves the
stores in sync again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from llm_twin_features import cli
from llm_twin_features.definitions import build_definitions
from llm_twin_features.defs.assets import scoped_run_config
from llm_twin_features.defs.jobs import FEATURE_PIPELINE_JOB
from llm_twin_features.domain.data_types import data_types
from llm_twin_features.settings import Settings
from llm_twin_features.stores.feature_store import Point, cleaned_collection, vector_collection

from ..conftest import SAMPLE_CORPUS, STORE_VARIABLES

VALID = {"posts": 30, "articles": 20, "repositories": 12}
INVALID = {"posts": 2, "articles": 2, "repositories": 1}
LONG_ARTICLE = "0c67a2cb-603c-4616-b7a2-2873705bdd12"  # "Asset-Based Orchestration with Dagster"


class Harness:
    def __init__(self, data_dir: Path, instance: dg.DagsterInstance) -> None:
        self.data_dir = data_dir
        self.instance = instance
        self.job = build_definitions().resolve_job_def(FEATURE_PIPELINE_JOB)

    def run(
        self, data_type: str, document_ids: list[str] | None = None, force: bool = False
    ) -> dict[str, dict]:
        """One run of the job for a partition; returns each asset's materialization metadata."""
        run_config = scoped_run_config(document_ids, force)
        result = self.job.execute_in_process(
            instance=self.instance, partition_key=data_type, run_config=run_config
        )
        assert result.success
        metadata = {}
        for event in result.get_asset_materialization_events():
            materialization = event.event_specific_data.materialization
            metadata[materialization.asset_key.to_user_string()] = {
                k: v.value for k, v in materialization.metadata.items()
            }
        checks = result.get_asset_check_evaluations()
        metadata["check"] = {"passed": all(c.passed for c in checks), "count": len(checks)}
        return metadata

    def cli(self, capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    def status(self, capsys) -> dict[str, dict]:
        code, out, _ = self.cli(capsys, "status", "--json")
        assert code == 0
        return {row["type"]: row for row in map(json.loads, out.splitlines())}

    def warehouse(self):
        from llm_twin_features.cli.common import warehouse_of as _warehouse

        return _warehouse(Settings())

    def feature_store(self):
        from llm_twin_features.cli.common import feature_store_of as _feature_store

        return _feature_store(Settings())


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    data_dir = tmp_path_factory.mktemp("e2e") / "data"
    with pytest.MonkeyPatch.context() as env:
        for name in STORE_VARIABLES:
            env.delenv(name, raising=False)
        env.setenv("LLM_TWIN_DATA_DIR", str(data_dir))
        assert cli.main(["ingest", str(SAMPLE_CORPUS)]) == 0
        with dg.instance_for_test() as instance:
            harness = Harness(data_dir, instance)
            harness.first_backfill = {t: harness.run(t) for t in data_types()}
            yield harness


def test_backfill_builds_both_snapshots_for_every_type(harness: Harness, capsys):
    status = harness.status(capsys)
    for data_type in data_types():
        row = status[data_type]
        assert row["warehouse"] == VALID[data_type] + INVALID[data_type]
        assert row["quarantined"] == INVALID[data_type]
        assert row["cleaned"] == VALID[data_type]
        assert row["vectors"] == row["chunks"] >= VALID[data_type]
        assert (row["missing"], row["stale"], row["orphans"], row["in_sync"]) == (0, 0, 0, True)

        metadata = harness.first_backfill[data_type]
        assert metadata["raw_documents"]["quarantined"] == INVALID[data_type]
        assert metadata["embedded_chunks"]["vectors_embedded"] == row["vectors"]
        assert metadata["embedded_chunks"]["vectors_reused"] == 0
        assert metadata["embedded_chunks"]["model_id"].startswith("bundled:all-MiniLM-L6-v2")
        assert metadata["check"] == {"passed": True, "count": 1}


def test_invalid_documents_are_quarantined_with_reasons(harness: Harness):
    with harness.warehouse() as warehouse:
        reasons = {q["entry_id"]: q["reason"] for q in warehouse.quarantine().find()}
    assert len(reasons) == sum(INVALID.values())
    assert all(i.startswith("invalid-") for i in reasons)
    assert (
        "content: Input should be a valid dictionary"
        in reasons["invalid-3ecce515-c900-4bc0-8c7d-ae9d4c7497b8"]
    )
    assert "link: Field required" in reasons["invalid-2996b98c-8ae4-47f6-b44a-c6556a435a0e"]


def test_payloads_carry_provenance_and_one_author_key(harness: Harness):
    with harness.feature_store() as store:
        for data_type in data_types():
            point = next(store.points(vector_collection(data_type)))
            payload = point.payload
            for key in (
                "document_id",
                "data_type",
                "author_id",
                "content_hash",
                "chunk_index",
                "model_id",
                "pipeline_version",
                "content",
            ):
                assert payload.get(key) is not None, (data_type, key)
            assert "text" not in payload  # the chunk text is stored once, under `content`
            document = [payload["document_id"]]  # the cleaned point of the same document
            cleaned = next(store.points(cleaned_collection(data_type), document)).payload
            assert cleaned["author_id"] and cleaned["cleaned_content"]
            # Repositories also carry the crawler's key, which the course's retriever filters on.
            for owner_payload in (payload, cleaned):
                expected = payload["author_id"] if data_type == "repositories" else None
                assert owner_payload.get("owner_id") == expected
    # Repositories keep the crawler's owner under the same key as posts and articles.
    with harness.feature_store() as store:
        authors = {p.payload["author_id"] for p in store.points(vector_collection("repositories"))}
    assert authors <= {
        "7c1e2f4a-9b3d-4e6f-8a1b-2c3d4e5f6a7b",
        "d94b6a21-5e7f-4c83-b2a9-0e1f3d5c7b9a",
    }


@pytest.mark.parametrize(
    ("query", "data_type", "expected"),
    [
        ("fuse BM25 and dense results with reciprocal rank fusion", "repositories", "9f3c5548-145"),
        ("fine-tune a 7B model with QLoRA on a single GPU", "articles", "5f4e4581-5c0"),
        (
            "change data capture keeps the vector database in sync with the warehouse",
            "articles",
            "3cc89b41-f33",
        ),
    ],
)
def test_search_finds_the_relevant_document(harness: Harness, capsys, query, data_type, expected):
    code, out, _ = harness.cli(
        capsys, "search", query, "--type", data_type, "--json", "--limit", "3"
    )
    assert code == 0
    results = [json.loads(line) for line in out.splitlines()]
    assert [r["rank"] for r in results] == [1, 2, 3]
    assert set(results[0]) >= {"query", "rank", "document_id", "score", "text"}
    assert results[0]["document_id"].startswith(expected)
    assert results[0]["score"] >= results[1]["score"]


def test_search_reads_queries_from_stdin(harness: Harness, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("vector database\nprompt monitoring\n"))
    code, out, _ = harness.cli(capsys, "search", "--json", "--limit", "2")
    assert code == 0
    queries = [json.loads(line)["query"] for line in out.splitlines()]
    assert queries == ["vector database"] * 2 + ["prompt monitoring"] * 2


def test_second_backfill_reembeds_nothing(harness: Harness):
    """Each stage skips unchanged documents on its own (forced: the partition-level skip of
    tests/e2e/test_small_changes.py would stop before the stages)."""
    for data_type in data_types():
        metadata = harness.run(data_type, force=True)
        assert metadata["raw_documents"]["upserted"] == 0
        assert metadata["raw_documents"]["skipped_unchanged"] == VALID[data_type]
        assert metadata["cleaned_documents"]["upserted"] == 0
        assert metadata["chunked_documents"]["upserted"] == 0
        assert metadata["embedded_chunks"]["vectors_embedded"] == 0
        assert metadata["embedded_chunks"]["upserted"] == 0


def test_editing_one_paragraph_reembeds_only_its_chunks(harness: Harness, capsys):
    with harness.warehouse() as warehouse:
        articles = warehouse.documents("articles")
        article = articles.get(LONG_ARTICLE)
        paragraphs = article["content"]["Content"].split("\n\n")
        paragraphs[-1] = "A completely new closing paragraph about lineage in the Dagster UI."
        article["content"]["Content"] = "\n\n".join(paragraphs)
        articles.replace_many([article])
        chunks_before = len(warehouse.chunk_state("articles").get(LONG_ARTICLE)["chunks"])

    metadata = harness.run("articles", [LONG_ARTICLE])
    embedded = metadata["embedded_chunks"]
    assert metadata["raw_documents"]["upserted"] == 1
    assert metadata["cleaned_documents"]["upserted"] == 1
    assert 1 <= embedded["vectors_embedded"] < chunks_before
    assert embedded["vectors_embedded"] + embedded["vectors_reused"] == embedded["chunks"]
    assert metadata["check"]["passed"]

    code, out, _ = harness.cli(
        capsys,
        "search",
        "lineage in the Dagster UI closing paragraph",
        "--type",
        "articles",
        "--json",
        "--limit",
        "1",
    )
    assert code == 0
    assert json.loads(out)["document_id"] == LONG_ARTICLE
    assert "completely new closing paragraph" in json.loads(out)["text"]
    assert harness.status(capsys)["articles"]["in_sync"]


def test_deleting_a_document_removes_all_its_points(harness: Harness, capsys):
    target = "9f3c5548-145"  # prefix of the hybrid-search-reranker repository
    with harness.warehouse() as warehouse:
        repositories = warehouse.documents("repositories")
        (document_id,) = [i for i in repositories.ids() if i.startswith(target)]
        repositories.delete_many([document_id])

    metadata = harness.run("repositories")  # a whole-partition run removes what left
    assert metadata["raw_documents"]["deleted"] == 1
    assert metadata["cleaned_documents"]["deleted"] == 1
    assert metadata["chunked_documents"]["deleted"] == 1
    assert metadata["embedded_chunks"]["deleted"] >= 1
    with harness.feature_store() as store:
        for collection in (cleaned_collection("repositories"), vector_collection("repositories")):
            assert list(store.points(collection, [document_id])) == []
    with harness.warehouse() as warehouse:
        assert warehouse.raw_state("repositories").get(document_id) is None
        assert warehouse.chunk_state("repositories").get(document_id) is None
    row = harness.status(capsys)["repositories"]
    assert (row["warehouse"], row["cleaned"], row["in_sync"]) == (12, 11, True)


def test_document_made_invalid_is_quarantined_and_removed(harness: Harness, capsys):
    post_id = "422acab5-924"
    with harness.warehouse() as warehouse:
        posts = warehouse.documents("posts")
        (document_id,) = [i for i in posts.ids() if i.startswith(post_id)]
        post = posts.get(document_id)
        posts.replace_many([{**post, "content": None}])

    metadata = harness.run("posts", [document_id])
    assert metadata["raw_documents"]["quarantined"] == 1
    assert metadata["embedded_chunks"]["deleted"] >= 1
    assert harness.status(capsys)["posts"]["quarantined"] == INVALID["posts"] + 1

    with harness.warehouse() as warehouse:  # repaired: it goes through and leaves quarantine
        warehouse.documents("posts").replace_many([post])
    metadata = harness.run("posts", [document_id])
    assert metadata["raw_documents"]["quarantined"] == 0
    assert metadata["embedded_chunks"]["vectors_embedded"] >= 1
    row = harness.status(capsys)["posts"]
    assert (row["quarantined"], row["cleaned"], row["in_sync"]) == (INVALID["posts"], 30, True)


def test_whole_partition_run_removes_orphan_points(harness: Harness, capsys):

    with harness.feature_store() as store:
        template = next(store.points(vector_collection("posts"), with_vectors=True))
        store.upsert(
            vector_collection("posts"),
            [
                Point(
                    id="00000000-0000-4000-8000-000000000001",
                    vector=template.vector,
                    payload={**template.payload, "document_id": "ghost"},
                )
            ],
        )
    assert harness.status(capsys)["posts"]["orphans"] == 1

    metadata = harness.run("posts")
    assert metadata["embedded_chunks"]["deleted"] == 1
    assert harness.status(capsys)["posts"]["orphans"] == 0
