"""Pydantic models of a document in each state: raw -> cleaned -> chunked -> embedded.

Raw models validate warehouse documents; a document that fails validation is quarantined with
the validation message as its reason. Posts and articles carry `author_id`, repositories
`owner_id`: every later state exposes one `author_id` so author filters work for every type.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Bump when cleaning or chunking changes output, so stored features are rebuilt.
PIPELINE_VERSION = "1"

_POINT_NAMESPACE = uuid.UUID("6f0d1c1e-7f8b-4d55-9a57-1c0f8f2b9e10")


def content_hash(value: Any) -> str:
    """A stable hash of JSON-able content (key order does not matter)."""
    encoded = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()


def text_hash(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()  # an id, not security


def document_point_id(data_type: str, document_id: str) -> str:
    return str(uuid.uuid5(_POINT_NAMESPACE, f"{data_type}/{document_id}"))


def chunk_point_id(data_type: str, document_id: str, chunk_index: int) -> str:
    return str(uuid.uuid5(_POINT_NAMESPACE, f"{data_type}/{document_id}/{chunk_index}"))


class RawDocument(BaseModel):
    """A warehouse document as crawled; subclasses add the type's own fields."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    data_type: ClassVar[str]

    entry_id: str = Field(min_length=1)
    author_id: str = Field(min_length=1)
    content: dict[str, Any]

    @field_validator("content")
    @classmethod
    def _content_has_text(cls, content: dict[str, Any]) -> dict[str, Any]:
        if not any(isinstance(v, str) and v.strip() for v in content.values()):
            raise ValueError("content has no text value")
        return content

    def metadata(self) -> dict[str, Any]:
        """Fields kept in every payload besides the text (platform, link, name...)."""
        return {}

    def text_size(self) -> int:
        """Characters of text in the content, the measure of the work a document makes."""
        return sum(len(v) for v in self.content.values() if isinstance(v, str))

    def fingerprint(self) -> str:
        """Hash of everything that shapes the features, so unchanged documents are skipped."""
        return content_hash(self.model_dump(mode="json", exclude={"entry_id"}))


class PostDocument(RawDocument):
    data_type: ClassVar[str] = "posts"
    platform: str

    def metadata(self) -> dict[str, Any]:
        return {"platform": self.platform}


class ArticleDocument(RawDocument):
    data_type: ClassVar[str] = "articles"
    platform: str
    link: str

    def metadata(self) -> dict[str, Any]:
        return {"platform": self.platform, "link": self.link}


class RepositoryDocument(RawDocument):
    data_type: ClassVar[str] = "repositories"
    name: str
    link: str
    # The crawler calls the author of a repository its owner.
    author_id: str = Field(min_length=1, validation_alias="owner_id")

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "link": self.link}


class CleanedDocument(BaseModel):
    entry_id: str
    data_type: str
    author_id: str
    content_hash: str
    cleaned_content: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class Chunk(BaseModel):
    chunk_index: int
    chunk_id: str  # md5 of the chunk text, as in the original design
    chunk_content: str


class ChunkedDocument(BaseModel):
    entry_id: str
    data_type: str
    author_id: str
    content_hash: str
    chunker: str  # signature of the chunking settings that produced `chunks`
    chunks: list[Chunk]
    metadata: dict[str, Any] = Field(default_factory=dict)


class EmbeddedChunk(BaseModel):
    entry_id: str
    data_type: str
    author_id: str
    content_hash: str
    chunk: Chunk
    embedding: list[float]
    model_id: str
    metadata: dict[str, Any] = Field(default_factory=dict)


RAW_MODELS: dict[str, type[RawDocument]] = {
    model.data_type: model for model in (PostDocument, ArticleDocument, RepositoryDocument)
}
