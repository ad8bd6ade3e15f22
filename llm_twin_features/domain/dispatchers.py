"""One dispatcher per stage, as in the original design: each picks what a data type needs
from its declaration (`domain/data_types.py`), so no stage has an if/else over types. An
unknown type raises `ValueError`, as in the original. (Which configured model embeds a type
is settings, not domain: `pipeline/embedders.py`.)
"""

from __future__ import annotations

from llm_twin_features.domain.chunking import TokenWindow, chunk_text, signature
from llm_twin_features.domain.data_types import spec_of
from llm_twin_features.domain.embedding import Embedder
from llm_twin_features.domain.models import (
    Chunk,
    ChunkedDocument,
    CleanedDocument,
    RawDocument,
    text_hash,
)


class CleaningDispatcher:
    @staticmethod
    def dispatch(data_type: str, raw: RawDocument) -> CleanedDocument:
        spec = spec_of(data_type)
        return CleanedDocument(
            entry_id=raw.entry_id,
            data_type=data_type,
            author_id=raw.author_id,
            content_hash=raw.fingerprint(),
            cleaned_content=spec.clean(raw.content),
            metadata=spec.metadata(raw),
            author_keys=spec.author_keys,
        )


class ChunkingDispatcher:
    @staticmethod
    def signature(data_type: str, embedder: Embedder) -> str:
        return signature(spec_of(data_type).chunking, embedder.signature)

    @staticmethod
    def dispatch(cleaned: CleanedDocument, embedder: Embedder) -> ChunkedDocument:
        """Chunks with the tokenizer and token window of the model that will embed them."""
        config = spec_of(cleaned.data_type).chunking
        window = TokenWindow(
            tokenizer=embedder.model.tokenizer, tokens_per_chunk=embedder.max_text_tokens
        )
        texts = chunk_text(cleaned.cleaned_content, config, window)
        return ChunkedDocument(
            entry_id=cleaned.entry_id,
            data_type=cleaned.data_type,
            author_id=cleaned.author_id,
            content_hash=cleaned.content_hash,
            chunker=signature(config, embedder.signature),
            chunks=[
                Chunk(chunk_index=i, chunk_id=text_hash(text), chunk_content=text)
                for i, text in enumerate(texts)
            ],
            metadata=cleaned.metadata,
            author_keys=cleaned.author_keys,
        )
