"""Pydantic models of a document in each state: raw -> cleaned -> chunked -> embedded.

Raw models validate warehouse documents; a document that fails validation is quarantined with
the validation message as its reason. Posts and articles carry `author_id`, repositories
`owner_id`: every later state exposes one `author_id` so author filters work for every type.
Payloads keep the keys the original pipeline's neighbours read: the chunk text under
`content`, the cleaned text under `cleaned_content`, and a repository's author under
`owner_id` too (the course's retriever filters repositories on it). README.md has the table.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any, ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Bump when cleaning or chunking changes output, or the payloads change, so stored features
# are rebuilt (the audit finds them stale; unchanged chunks keep their vectors).
# 2: chunk text under `content` (was `text`), repositories' author also under `owner_id`.
PIPELINE_VERSION = "2"

METADATA_KEYS = ("platform", "link", "name")  # type-specific fields kept in payloads
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
    """A document's cleaned text: one point of the `cleaned_{type}` snapshot."""

    entry_id: str
    data_type: str
    author_id: str
    content_hash: str
    cleaned_content: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    author_keys: ClassVar[tuple[str, ...]] = ("author_id",)  # payload keys of the author

    def payload(self) -> dict[str, Any]:
        return {
            "document_id": self.entry_id,
            "data_type": self.data_type,
            **dict.fromkeys(self.author_keys, self.author_id),
            "content_hash": self.content_hash,
            "cleaned_content": self.cleaned_content,
            "chunk_index": None,
            "model_id": None,
            "pipeline_version": PIPELINE_VERSION,
            **self.metadata,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> CleanedDocument:
        return cls(
            entry_id=payload["document_id"],
            data_type=payload["data_type"],
            author_id=payload["author_id"],
            content_hash=payload["content_hash"],
            cleaned_content=payload["cleaned_content"],
            metadata={k: v for k, v in payload.items() if k in METADATA_KEYS},
        )


class Chunk(BaseModel):
    chunk_index: int
    chunk_id: str  # md5 of the chunk text, as in the original design
    chunk_content: str


class ChunkedDocument(BaseModel):
    """A document's chunks, kept in the chunk stage state."""

    entry_id: str
    data_type: str
    author_id: str
    content_hash: str
    chunker: str  # signature of the chunking settings that produced `chunks`
    chunks: list[Chunk]
    metadata: dict[str, Any] = Field(default_factory=dict)


class EmbeddedChunk(BaseModel):
    """One chunk as embedded by `model_id`: one point of the `vector_{type}` snapshot (the
    vector itself goes straight from the model into the point)."""

    entry_id: str
    data_type: str
    author_id: str
    content_hash: str
    chunk: Chunk
    model_id: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    author_keys: ClassVar[tuple[str, ...]] = ("author_id",)  # payload keys of the author

    @classmethod
    def of(cls, document: ChunkedDocument, index: int, model_id: str) -> EmbeddedChunk:
        """The chunk at `index`, before (or without) its vector."""
        return cls(
            entry_id=document.entry_id,
            data_type=document.data_type,
            author_id=document.author_id,
            content_hash=document.content_hash,
            chunk=document.chunks[index],
            model_id=model_id,
            metadata=document.metadata,
        )

    @property
    def point_id(self) -> str:
        return chunk_point_id(self.data_type, self.entry_id, self.chunk.chunk_index)

    def payload(self) -> dict[str, Any]:
        return {
            "document_id": self.entry_id,
            "data_type": self.data_type,
            **dict.fromkeys(self.author_keys, self.author_id),
            "content_hash": self.content_hash,
            "chunk_index": self.chunk.chunk_index,
            "chunk_id": self.chunk.chunk_id,
            "content": self.chunk.chunk_content,  # the key the course's retriever reads
            "model_id": self.model_id,
            "pipeline_version": PIPELINE_VERSION,
            **self.metadata,
        }


# One model per type and state. The type-specific fields of a raw document (platform, link,
# name) travel on as `metadata`; `data_type` pins each state model to its type.


class PostCleaned(CleanedDocument):
    data_type: Literal["posts"] = "posts"


class ArticleCleaned(CleanedDocument):
    data_type: Literal["articles"] = "articles"


class RepositoryCleaned(CleanedDocument):
    data_type: Literal["repositories"] = "repositories"
    author_keys: ClassVar[tuple[str, ...]] = ("author_id", "owner_id")


class PostChunked(ChunkedDocument):
    data_type: Literal["posts"] = "posts"


class ArticleChunked(ChunkedDocument):
    data_type: Literal["articles"] = "articles"


class RepositoryChunked(ChunkedDocument):
    data_type: Literal["repositories"] = "repositories"


class PostEmbeddedChunk(EmbeddedChunk):
    data_type: Literal["posts"] = "posts"


class ArticleEmbeddedChunk(EmbeddedChunk):
    data_type: Literal["articles"] = "articles"


class RepositoryEmbeddedChunk(EmbeddedChunk):
    data_type: Literal["repositories"] = "repositories"
    author_keys: ClassVar[tuple[str, ...]] = ("author_id", "owner_id")


class StateModels(NamedTuple):
    raw: type[RawDocument]
    cleaned: type[CleanedDocument]
    chunked: type[ChunkedDocument]
    embedded: type[EmbeddedChunk]


STATE_MODELS: dict[str, StateModels] = {
    "posts": StateModels(PostDocument, PostCleaned, PostChunked, PostEmbeddedChunk),
    "articles": StateModels(ArticleDocument, ArticleCleaned, ArticleChunked, ArticleEmbeddedChunk),
    "repositories": StateModels(
        RepositoryDocument, RepositoryCleaned, RepositoryChunked, RepositoryEmbeddedChunk
    ),
}
RAW_MODELS: dict[str, type[RawDocument]] = {t: m.raw for t, m in STATE_MODELS.items()}
