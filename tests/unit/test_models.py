"""Validation of warehouse documents, ids and dispatch by data type."""

import pytest
from pydantic import ValidationError

from llm_twin_features.domain.dispatchers import CleaningDispatcher
from llm_twin_features.domain.models import chunk_point_id, document_point_id
from llm_twin_features.domain.validation import describe_error, validate
from llm_twin_features.pipeline.embedders import EmbeddingDispatcher
from llm_twin_features.settings import INSTRUCTOR_CODE_INSTRUCTION, Settings

from ..conftest import sample_documents

POST = {"_id": "p1", "platform": "linkedin", "content": {"text": "Hello"}, "author_id": "u1"}
REPO = {
    "_id": "r1",
    "name": "twin",
    "link": "https://github.com/x/twin",
    "content": {"main.py": "print(1)"},
    "owner_id": "u2",
}


def test_author_is_exposed_under_one_key_for_every_type():
    """The original stored the post author under `owner_id`, so author filters found nothing."""
    assert validate("posts", POST).author_id == "u1"
    assert validate("repositories", REPO).author_id == "u2"
    cleaned = CleaningDispatcher.dispatch("repositories", validate("repositories", REPO))
    assert cleaned.author_id == "u2" and cleaned.metadata == {"name": "twin", "link": REPO["link"]}


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({**POST, "content": None}, "content: Input should be a valid dictionary"),
        ({k: v for k, v in POST.items() if k != "author_id"}, "author_id: Field required"),
        (
            {**POST, "content": {"text": None, "image": None}},
            "content: Value error, content has no text value",
        ),
        ({**POST, "platform": 3}, "platform: Input should be a valid string"),
    ],
)
def test_invalid_documents_are_rejected_with_a_readable_reason(document, reason):
    with pytest.raises(ValidationError) as error:
        validate("posts", document)
    assert reason in describe_error(error.value)


def test_sample_corpus_has_exactly_the_documented_invalid_documents():
    invalid = []
    for document in sample_documents():
        data_type = document.pop("type")
        try:
            validate(data_type, document)
        except ValidationError:
            invalid.append(document["_id"])
    assert len(invalid) == 5 and all(i.startswith("invalid-") for i in invalid)


def test_fingerprint_ignores_key_order_but_sees_content_changes():
    a = validate("posts", POST)
    b = validate("posts", dict(reversed(list(POST.items()))))
    c = validate("posts", {**POST, "content": {"text": "Hello!"}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_point_ids_are_deterministic_uuids():
    assert document_point_id("posts", "p1") == document_point_id("posts", "p1")
    assert document_point_id("posts", "p1") != document_point_id("articles", "p1")
    assert chunk_point_id("posts", "p1", 0) != chunk_point_id("posts", "p1", 1)
    assert len(chunk_point_id("posts", "p1", 0)) == 36


def test_unknown_type_is_a_value_error():
    with pytest.raises(ValueError, match="unknown data type 'users'"):
        validate("users", {"_id": "u", "first_name": "Ada"})
    with pytest.raises(ValueError, match="unknown data type 'users'"):
        EmbeddingDispatcher.embedder("users", Settings())


def test_code_uses_the_instructor_path_and_prose_does_not():
    settings = Settings(
        code_embedding_model="hkunlp/instructor-xl",
        code_embedding_instruction=INSTRUCTOR_CODE_INSTRUCTION,
    )
    code = EmbeddingDispatcher.embedder("repositories", settings)
    prose = EmbeddingDispatcher.embedder("articles", settings)
    assert code.model_id == "hkunlp/instructor-xl"
    assert code.instruction == INSTRUCTOR_CODE_INSTRUCTION
    assert prose.instruction is None
    # By default code has no instruction: the bundled MiniLM was not trained for them.
    assert EmbeddingDispatcher.embedder("repositories", Settings()).instruction is None


def test_every_type_is_declared_once_and_its_payloads_follow_the_declaration():
    from llm_twin_features.domain.data_types import data_types, spec_of
    from llm_twin_features.domain.models import CleanedDocument

    assert data_types() == ("posts", "articles", "repositories")
    cleaned = CleaningDispatcher.dispatch("posts", validate("posts", POST))
    assert cleaned.payload()["platform"] == "linkedin"
    spec = spec_of("posts")
    restored = CleanedDocument.from_payload(
        cleaned.payload(), spec.author_keys, spec.metadata_fields
    )
    assert restored == cleaned
    repository = CleaningDispatcher.dispatch("repositories", validate("repositories", REPO))
    payload = repository.payload()
    assert (payload["author_id"], payload["owner_id"]) == ("u2", "u2")
    assert "owner_id" not in cleaned.payload()


def test_a_type_cannot_be_declared_twice_differently():
    from dataclasses import replace

    from llm_twin_features.domain.data_types import register, spec_of

    posts = spec_of("posts")
    assert register(posts) is posts  # the same declaration again is harmless
    with pytest.raises(ValueError, match="already registered differently"):
        register(replace(posts, metadata_fields=()))
