"""One dispatcher per stage; each picks the handler for a data type from a factory.

Adding a data type means registering a handler per stage (and a raw model in `models.py`);
no stage has an if/else over types. An unknown type raises `ValueError`, as in the original.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Generic, TypeVar

from llm_twin_features.domain.chunking import ChunkingConfig, TokenWindow, chunk_text, signature
from llm_twin_features.domain.cleaning import clean_content, clean_repository_content
from llm_twin_features.domain.embedding import Embedder, encode_workers
from llm_twin_features.domain.models import (
    ArticleChunked,
    ArticleCleaned,
    Chunk,
    ChunkedDocument,
    CleanedDocument,
    PostChunked,
    PostCleaned,
    RawDocument,
    RepositoryChunked,
    RepositoryCleaned,
    text_hash,
)
from llm_twin_features.settings import Settings

H = TypeVar("H")


class HandlerFactory(Generic[H]):
    """Creates the handler registered for a data type."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._handlers: dict[str, type[H]] = {}

    def register(self, data_type: str) -> Callable[[type[H]], type[H]]:
        def decorate(handler: type[H]) -> type[H]:
            self._handlers[data_type] = handler
            return handler

        return decorate

    def create(self, data_type: str) -> H:
        try:
            return self._handlers[data_type]()
        except KeyError:
            raise ValueError(
                f"no {self.stage} handler for data type {data_type!r}; "
                f"known: {', '.join(sorted(self._handlers))}"
            ) from None


# --- cleaning ---------------------------------------------------------------------------------


class CleaningHandler(ABC):
    model: type[CleanedDocument]

    def clean(self, raw: RawDocument) -> CleanedDocument:
        return self.model(
            entry_id=raw.entry_id,
            author_id=raw.author_id,
            content_hash=raw.fingerprint(),
            cleaned_content=self.clean_text(raw),
            metadata=raw.metadata(),
        )

    @abstractmethod
    def clean_text(self, raw: RawDocument) -> str: ...


cleaning_handlers: HandlerFactory[CleaningHandler] = HandlerFactory("cleaning")


@cleaning_handlers.register("posts")
class PostCleaningHandler(CleaningHandler):
    model = PostCleaned

    def clean_text(self, raw: RawDocument) -> str:
        return clean_content(raw.content)


@cleaning_handlers.register("articles")
class ArticleCleaningHandler(CleaningHandler):
    model = ArticleCleaned

    def clean_text(self, raw: RawDocument) -> str:
        return clean_content(raw.content)


@cleaning_handlers.register("repositories")
class RepositoryCleaningHandler(CleaningHandler):
    model = RepositoryCleaned

    def clean_text(self, raw: RawDocument) -> str:
        return clean_repository_content(raw.content)


class CleaningDispatcher:
    @staticmethod
    def dispatch(raw: RawDocument) -> CleanedDocument:
        return cleaning_handlers.create(raw.data_type).clean(raw)


# --- chunking ---------------------------------------------------------------------------------


class ChunkingHandler:
    model: type[ChunkedDocument]
    config = ChunkingConfig()

    def chunk(self, cleaned: CleanedDocument, embedder: Embedder) -> ChunkedDocument:
        window = TokenWindow(
            tokenizer=embedder.model.tokenizer, tokens_per_chunk=embedder.max_text_tokens
        )
        texts = chunk_text(cleaned.cleaned_content, self.config, window)
        return self.model(
            entry_id=cleaned.entry_id,
            author_id=cleaned.author_id,
            content_hash=cleaned.content_hash,
            chunker=signature(self.config, embedder.signature),
            chunks=[
                Chunk(chunk_index=i, chunk_id=text_hash(text), chunk_content=text)
                for i, text in enumerate(texts)
            ],
            metadata=cleaned.metadata,
        )


chunking_handlers: HandlerFactory[ChunkingHandler] = HandlerFactory("chunking")


@chunking_handlers.register("posts")
class PostChunkingHandler(ChunkingHandler):
    model = PostChunked


@chunking_handlers.register("articles")
class ArticleChunkingHandler(ChunkingHandler):
    model = ArticleChunked


@chunking_handlers.register("repositories")
class RepositoryChunkingHandler(ChunkingHandler):
    model = RepositoryChunked
    # Code rarely has blank lines every 500 characters: also split on lines, in larger pieces.
    config = ChunkingConfig(separators=["\n\n", "\n"], chunk_size=1000)


class ChunkingDispatcher:
    @staticmethod
    def signature(data_type: str, embedder: Embedder) -> str:
        return signature(chunking_handlers.create(data_type).config, embedder.signature)

    @staticmethod
    def dispatch(cleaned: CleanedDocument, embedder: Embedder) -> ChunkedDocument:
        """Chunks with the tokenizer and token window of the model that will embed them."""
        return chunking_handlers.create(cleaned.data_type).chunk(cleaned, embedder)


# --- embedding --------------------------------------------------------------------------------


class EmbeddingHandler:
    """Prose: the general text model, no instruction."""

    def embedder(self, settings: Settings) -> Embedder:
        model_id, instruction = self.model(settings)
        return Embedder(
            model_id,
            instruction,
            settings.embedding_batch_size,
            settings.embedding_service_url,
            encode_workers(settings.embedding_workers),
        )

    def model(self, settings: Settings) -> tuple[str, str | None]:
        """The model id and the instruction documents are embedded with."""
        return settings.embedding_model, None

    def query_instruction(self, settings: Settings) -> str | None:
        return None


embedding_handlers: HandlerFactory[EmbeddingHandler] = HandlerFactory("embedding")


@embedding_handlers.register("posts")
class PostEmbeddingHandler(EmbeddingHandler):
    pass


@embedding_handlers.register("articles")
class ArticleEmbeddingHandler(EmbeddingHandler):
    pass


@embedding_handlers.register("repositories")
class RepositoryEmbeddingHandler(EmbeddingHandler):
    """Code goes through the INSTRUCTOR path: its own model, with instructions."""

    def model(self, settings: Settings) -> tuple[str, str | None]:
        return settings.code_embedding_model, settings.code_embedding_instruction

    def query_instruction(self, settings: Settings) -> str | None:
        return settings.code_query_instruction


class EmbeddingDispatcher:
    @staticmethod
    def embedder(data_type: str, settings: Settings) -> Embedder:
        return embedding_handlers.create(data_type).embedder(settings)

    @staticmethod
    def query_instruction(data_type: str, settings: Settings) -> str | None:
        return embedding_handlers.create(data_type).query_instruction(settings)
