"""BM25 sparse vectors: tokens that keywords and identifiers are found by, values that depend
on the chunk alone (so an unchanged chunk keeps its vector), stable indices."""

import subprocess
import sys

from llm_twin_features.domain.sparse import document_vector, query_vector, token_index, tokenize


def test_identifiers_match_by_their_parts_and_whole():
    tokens = tokenize("def set_pooling_include_prompt(self): return HTTPServer()")
    for token in ("set_pooling_include_prompt", "pooling", "prompt", "httpserver", "http"):
        assert token in tokens, token
    assert "server" in tokenize("parseRequirement and HTTPServer")
    assert "requirement" in tokenize("parseRequirement")


def test_stop_words_single_characters_and_case_are_dropped():
    assert tokenize("The cat is on a Mat, x") == ["cat", "mat"]
    assert tokenize("Café ÉCOLE") == ["café", "école"]  # accents kept, case folded


def test_document_values_saturate_with_term_frequency_and_ignore_the_corpus():
    indices, values = document_vector("qdrant qdrant qdrant qdrant vector")
    weights = dict(zip(indices, values, strict=True))
    once, four_times = weights[token_index("vector")], weights[token_index("qdrant")]
    assert once < four_times < 4 * once  # more is better, but saturating (BM25's k1)
    assert document_vector("qdrant vector") == document_vector("qdrant vector")
    assert indices == sorted(indices) and len(set(indices)) == len(indices)


def test_query_tokens_count_once_with_unit_weight():
    indices, values = query_vector("sync sync the vector database")
    assert len(indices) == 3 and values == [1.0, 1.0, 1.0]
    assert query_vector("") == ([], [])


def test_indices_are_the_same_in_every_process():
    """Python's hash() is salted per process; a stored vector must match later queries."""
    code = "from llm_twin_features.domain.sparse import token_index; print(token_index('qdrant'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert int(other.stdout) == token_index("qdrant") < 2**32
