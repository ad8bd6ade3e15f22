"""The warehouse adapter's contract, on montydb always and on real MongoDB when
`TEST_MONGO_URI` is set (e.g. mongodb://127.0.0.1:27017/?replicaSet=rs0)."""

import os
import uuid
from pathlib import Path

import pytest

from llm_twin_features.stores.warehouse import open_warehouse

BACKENDS = ["montydb"] + (["mongodb"] if os.environ.get("TEST_MONGO_URI") else [])


@pytest.fixture(params=BACKENDS)
def warehouse(request, tmp_path: Path):
    if request.param == "mongodb":
        suffix = uuid.uuid4().hex[:8]
        store = open_warehouse(
            os.environ["TEST_MONGO_URI"],
            f"twin_test_{suffix}",
            f"twin_features_test_{suffix}",
            tmp_path,
        )
        yield store
        store.client.drop_database(store.database)
        store.client.drop_database(store.features_database)
    else:
        store = open_warehouse(None, "twin", "twin_features", tmp_path)
        yield store
    store.close()


def test_replace_many_upserts_by_id_and_last_write_wins(warehouse):
    posts = warehouse.documents("posts")
    posts.replace_many([{"_id": "a", "v": 1}, {"_id": "b", "v": 1}])
    posts.replace_many([{"_id": "a", "v": 2}, {"_id": "c", "v": 1}, {"_id": "c", "v": 3}])
    assert {d["_id"]: d["v"] for d in posts.find()} == {"a": 2, "b": 1, "c": 3}
    assert posts.count() == 3


def test_keys_with_dots_are_stored_as_in_mongodb(warehouse):
    """Repository content maps file paths ("README.md") to text."""
    repositories = warehouse.documents("repositories")
    repositories.replace_many([{"_id": "r", "content": {"README.md": "# hi", "src/a.py": "x = 1"}}])
    assert repositories.get("r")["content"] == {"README.md": "# hi", "src/a.py": "x = 1"}


def test_find_by_ids_with_projection(warehouse):
    articles = warehouse.documents("articles")
    articles.replace_many([{"_id": str(i), "link": f"l{i}", "body": "x"} for i in range(10)])
    found = {d["_id"]: d for d in articles.find(["3", "7", "missing"], fields=["link"])}
    assert set(found) == {"3", "7"}
    assert found["3"] == {"_id": "3", "link": "l3"}
    assert articles.ids() == {str(i) for i in range(10)}


def test_delete_many_counts_only_existing_documents(warehouse):
    posts = warehouse.documents("posts")
    posts.replace_many([{"_id": "a"}, {"_id": "b"}])
    assert posts.delete_many(["a", "zzz"]) == 1
    assert posts.delete_many([]) == 0
    assert posts.ids() == {"b"}


def test_stage_state_lives_next_to_the_warehouse(warehouse):
    warehouse.raw_state("posts").replace_many([{"_id": "a", "content_hash": "h"}])
    warehouse.chunk_state("posts").replace_many([{"_id": "a", "chunks": []}])
    assert warehouse.documents("posts").count() == 0
    assert warehouse.raw_state("posts").get("a")["content_hash"] == "h"
    assert warehouse.chunk_state("posts").ids() == {"a"}


def test_digest_follows_the_content_not_the_write_order(warehouse):
    """The sync ledger compares digests: equal content, equal digest; any edit, addition or
    deletion, another digest."""
    posts, articles = warehouse.documents("posts"), warehouse.documents("articles")
    empty = posts.digest()
    assert empty == articles.digest()
    documents = [{"_id": str(i), "content": {"text": f"post {i}"}} for i in range(5)]
    posts.replace_many(documents)
    articles.replace_many(list(reversed(documents)))
    assert posts.digest() == articles.digest() != empty
    before = posts.digest()
    posts.replace_many([{"_id": "3", "content": {"text": "post 3, edited"}}])
    edited = posts.digest()
    assert edited != before
    posts.delete_many(["4"])
    assert posts.digest() not in (before, edited)


def test_unknown_collection_is_refused(warehouse):
    with pytest.raises(ValueError, match="unknown data type 'users'"):
        warehouse.documents("users")


def test_embedded_warehouse_is_shared_between_handles(tmp_path: Path):
    """Two handles (as two processes would) see each other's writes."""
    first = open_warehouse(None, "twin", "twin_features", tmp_path)
    second = open_warehouse(None, "twin", "twin_features", tmp_path)
    first.documents("posts").replace_many([{"_id": "a", "v": 1}])
    assert second.documents("posts").get("a") == {"_id": "a", "v": 1}
    first.close()
    second.close()


def test_mongo_uri_must_be_a_mongodb_url(tmp_path: Path):
    with pytest.raises(ValueError, match="MONGO_URI must start with mongodb://"):
        open_warehouse("http://localhost:27017", "twin", "twin_features", tmp_path)
