"""Admission of warehouse documents: a document the pipeline cannot take is quarantined with
the reason these functions give."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from llm_twin_features.domain.data_types import spec_of
from llm_twin_features.domain.models import RawDocument

DEFAULT_MAX_DOCUMENT_CHARS = 1_000_000  # ~2,000 chunks of 500 characters


class UnreadableDocument(dict):
    """A stored row that could not be decoded: only its `_id`, and why. Stores return it in
    place of the document so that readers quarantine it instead of failing on the whole
    collection; `delete` can still remove it."""

    def __init__(self, document_id: str, reason: str) -> None:
        super().__init__(_id=document_id)
        self.reason = reason


class DocumentTooLarge(ValueError):
    """More text than one document may carry; quarantined instead of exhausting memory."""


def validate(data_type: str, document: dict[str, Any]) -> RawDocument:
    """A warehouse document as its type's raw model; raises ValidationError/ValueError."""
    if isinstance(document, UnreadableDocument):
        raise ValueError(document.reason)
    model = spec_of(data_type).raw_model
    return model.model_validate({**document, "entry_id": str(document.get("_id", ""))})


def admit(data_type: str, document: dict[str, Any], max_chars: int) -> RawDocument:
    """The validated document if the pipeline takes it; raises with the reason otherwise."""
    raw = validate(data_type, document)
    size = raw.text_size()
    if size > max_chars:
        raise DocumentTooLarge(
            f"document too large: {size:,} characters of text, the limit is {max_chars:,} "
            "(MAX_DOCUMENT_CHARS)"
        )
    return raw


def describe_error(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'document'}: {e['msg']}"
            for e in error.errors()
        )
    return str(error)
