"""Pydantic models of a document in each state: raw -> cleaned -> chunked -> embedded.

The models are shared by every data type; what differs per type (the raw model's fields, the
metadata and author keys of its payloads) is declared once in `domain/data_types.py`. A
document that fails its raw model is quarantined with the validation message as its reason.
Every state exposes one `author_id`, so author filters work for every type.
Payloads keep the keys the original pipeline's neighbours read: the chunk text under
`content`, the cleaned text under `cleaned_content`, and a repository's author under
`owner_id` too (the course's retriever filters repositories on it). README.md has the table.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Bump when cleaning or chunking changes output, or the payloads change, so stored features
# are rebuilt (the audit finds them stale; unchanged chunks keep their vectors).
# 2: chunk text under `content` (was `text`), repositories' author also under `owner_id`.
# 3: a BM25 sparse vector (`domain/sparse.py`) next to each dense one, for hybrid search.
PIPELINE_VERSION = "3"

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
    """A warehouse document as crawled; each data type's model adds its own fields
    (`domain/data_types.py`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    entry_id: str = Field(min_length=1)
    author_id: str = Field(min_length=1)
    content: dict[str, Any]

    @field_validator("content")
    @classmethod
    def _content_has_text(cls, content: dict[str, Any]) -> dict[str, Any]:
        if not any(isinstance(v, str) and v.strip() for v in content.values()):
            raise ValueError("content has no text value")
        return content

    def text_size(self) -> int:
        """Characters of text in the content, the measure of the work a document makes."""
        return sum(len(v) for v in self.content.values() if isinstance(v, str))

    def fingerprint(self) -> str:
        """Hash of everything that shapes the features, so unchanged documents are skipped."""
        return content_hash(self.model_dump(mode="json", exclude={"entry_id"}))


class CleanedDocument(BaseModel):
    """A document's cleaned text: one point of the `cleaned_{type}` snapshot. `author_keys`
    and `metadata` come from the data type's declaration."""

    entry_id: str
    data_type: str
    author_id: str
    content_hash: str
    cleaned_content: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    author_keys: tuple[str, ...] = ("author_id",)  # payload keys of the author

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
    def from_payload(
        cls, payload: dict[str, Any], author_keys: tuple[str, ...], metadata_fields: tuple[str, ...]
    ) -> CleanedDocument:
        return cls(
            entry_id=payload["document_id"],
            data_type=payload["data_type"],
            author_id=payload["author_id"],
            content_hash=payload["content_hash"],
            cleaned_content=payload["cleaned_content"],
            metadata={k: v for k, v in payload.items() if k in metadata_fields},
            author_keys=author_keys,
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
    author_keys: tuple[str, ...] = ("author_id",)


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
    author_keys: tuple[str, ...] = ("author_id",)

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
            author_keys=document.author_keys,
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
