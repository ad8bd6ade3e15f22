"""Chunk boundaries and overlap with the real tokenizer of the bundled embedding model."""

import pytest

from llm_twin_features.domain.chunking import (
    ChunkingConfig,
    TokenWindow,
    chunk_text,
    split_on_tokens,
)
from llm_twin_features.domain.dispatchers import ChunkingDispatcher
from llm_twin_features.domain.embedding import BUNDLED_MODEL, Embedder
from llm_twin_features.domain.models import CleanedDocument

PARAGRAPH = (
    "Feature pipelines turn raw crawled documents into features. They clean the text, split it "
    "into chunks that fit the embedding model, and embed every chunk into a vector."
)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def window(embedder: Embedder) -> TokenWindow:
    return TokenWindow(
        tokenizer=embedder.model.tokenizer, tokens_per_chunk=embedder.max_text_tokens
    )


def token_count(window: TokenWindow, text: str) -> int:
    return len(window.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_token_window_leaves_room_for_special_tokens(embedder: Embedder):
    assert embedder.model.max_seq_length == 256
    assert embedder.max_text_tokens == 254  # [CLS] and [SEP] take two positions


def test_short_paragraphs_are_merged_up_to_chunk_size(window: TokenWindow):
    text = "\n\n".join(f"Paragraph {i}. {PARAGRAPH}" for i in range(6))
    chunks = chunk_text(text, ChunkingConfig(), window)
    assert all(len(c) <= 500 for c in chunks)
    # Each paragraph is ~180 characters: two fit in 500 characters, three do not.
    assert len(chunks) == 3
    assert chunks[0].startswith("Paragraph 0.") and "Paragraph 1." in chunks[0]
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")


def test_separators_are_configurable(window: TokenWindow):
    text = "line one\nline two\nline three"
    chunks = chunk_text(text, ChunkingConfig(separators=["\n"], chunk_size=10), window)
    assert chunks == ["line one", "line two", "line three"]


def test_long_piece_is_cut_into_overlapping_token_windows(window: TokenWindow):
    text = " ".join(f"token{i}" for i in range(400))  # no separator: one long piece
    pieces = split_on_tokens(text, window, overlap=50)
    assert len(pieces) > 1
    assert all(token_count(window, p) <= window.tokens_per_chunk for p in pieces)
    # Consecutive windows share their boundary text: the overlap.
    first_tail = pieces[0].split()[-10:]
    assert " ".join(first_tail) in pieces[1]
    assert pieces[-1].endswith("token399")


def test_token_windows_keep_original_case_and_punctuation(window: TokenWindow):
    """LangChain's token splitter returns re-tokenised, lower-cased text; these are slices."""
    text = "Qdrant's HNSW Index, MongoDB's Change-Streams! " * 60
    pieces = split_on_tokens(text, window, overlap=20)
    assert len(pieces) > 1
    assert all(piece in text for piece in pieces)
    assert "Qdrant's HNSW Index" in pieces[1]


def test_overlap_larger_than_window_still_progresses():
    class Words:
        def __call__(self, texts, **_):
            spans = []
            for text in texts:
                offsets, start = [], 0
                for word in text.split(" "):
                    offsets.append((start, start + len(word)))
                    start += len(word) + 1
                spans.append(offsets)
            return {"offset_mapping": spans}

    window = TokenWindow(tokenizer=Words(), tokens_per_chunk=3)
    assert split_on_tokens("a b c d e", window, overlap=10) == ["a b c", "b c d", "c d e"]


def test_dispatcher_chunks_with_per_type_config(embedder: Embedder):
    code = "\n".join(f"x_{i} = compute({i})  # step {i}" for i in range(120))
    cleaned = CleanedDocument(
        entry_id="r1",
        data_type="repositories",
        author_id="a",
        content_hash="h",
        cleaned_content=code,
    )
    chunked = ChunkingDispatcher.dispatch(cleaned, embedder)
    # Repositories split on lines in pieces of up to 1000 characters (no blank lines here).
    assert len(chunked.chunks) > 1
    assert all(len(c.chunk_content) <= 1000 for c in chunked.chunks)
    assert [c.chunk_index for c in chunked.chunks] == list(range(len(chunked.chunks)))


def test_unknown_type_raises_value_error():
    with pytest.raises(ValueError, match="unknown data type 'videos'"):
        ChunkingDispatcher.signature("videos", Embedder(BUNDLED_MODEL))
