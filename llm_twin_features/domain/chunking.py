"""Two-step chunking: split on separators into character-bounded pieces, then cut any piece
that exceeds the embedding model's token window into overlapping token windows.

Unlike LangChain's `SentenceTransformersTokenTextSplitter` (which builds a second model from
the hub and returns lower-cased, re-tokenised text), the token step here reuses the embedding
model's own tokenizer and slices the original text by token offsets, so chunk text keeps its
case and punctuation. The window leaves room for the model's special tokens, so no chunk is
truncated at embedding time.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from llm_twin_features.domain.models import content_hash


class ChunkingConfig(BaseModel):
    """Per data type; the defaults are the original pipeline's."""

    separators: list[str] = Field(default_factory=lambda: ["\n\n"])
    chunk_size: int = Field(default=500, gt=0)
    chunk_overlap: int = Field(default=0, ge=0)
    token_overlap: int = Field(default=50, ge=0)


class TokenWindow(BaseModel):
    """The embedding model's tokenizer and how many text tokens fit in one input."""

    model_config = {"arbitrary_types_allowed": True}

    tokenizer: object
    tokens_per_chunk: int = Field(gt=0)


def signature(config: ChunkingConfig, embedder_signature: str) -> str:
    """Identifies the chunking that produced a stored chunk list; a change re-chunks.

    The token window follows from the embedding model and instruction, so their signature
    stands for it and no model has to be loaded to tell that stored chunks are current.
    """
    return content_hash({"config": config.model_dump(), "embedder": embedder_signature})[:16]


def token_offsets(texts: list[str], window: TokenWindow) -> list[list[tuple[int, int]]]:
    """The character span of every token of every text, in one tokenizer call."""
    if not texts:
        return []
    return window.tokenizer(  # type: ignore[operator]
        texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False
    )["offset_mapping"]


def _windows(text: str, offsets: list, size: int, overlap: int) -> list[str]:
    if len(offsets) <= size:
        return [text] if text.strip() else []
    step = max(size - min(overlap, size - 1), 1)
    pieces = []
    for start in range(0, len(offsets), step):
        tokens = offsets[start : start + size]
        pieces.append(text[tokens[0][0] : tokens[-1][1]])
        if start + size >= len(offsets):
            break
    return pieces


def split_on_tokens(text: str, window: TokenWindow, overlap: int) -> list[str]:
    """Overlapping windows of at most `tokens_per_chunk` tokens, as slices of `text`."""
    (offsets,) = token_offsets([text], window)
    return _windows(text, offsets, window.tokens_per_chunk, overlap)


def chunk_text(text: str, config: ChunkingConfig, window: TokenWindow) -> list[str]:
    # Imported here: LangChain takes 0.15 s to import, which every command would pay.
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter(
        separators=config.separators,
        chunk_size=config.chunk_size,
        chunk_overlap=config.chunk_overlap,
    )
    sections = [s.strip() for s in splitter.split_text(text) if s.strip()]
    return [
        piece
        for section, offsets in zip(sections, token_offsets(sections, window), strict=True)
        for piece in _windows(section, offsets, window.tokens_per_chunk, config.token_overlap)
    ]
