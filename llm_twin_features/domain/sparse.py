"""BM25 sparse vectors, computed locally (no model, no hub), for Qdrant's sparse vectors with
`Modifier.IDF`: the keyword half of hybrid retrieval. Measured on the eval (`make eval`), words
the user types that the dense model blurs (names, identifiers, rare terms) find their chunk.

Scheme
- tokens: NFKC, lower-case; words are runs of letters/digits; identifiers are also split into
  their parts (`parse_requirement`, `parseRequirement`, `HTTPServer` -> `parse`,
  `requirement`, `http`, `server`), and the whole identifier is kept too (so `getattr` or
  `set_pooling_include_prompt` match exactly); a short English stop list; tokens of one
  character dropped; no stemming (code and names suffer from it).
- index: the crc32 of the token (stable across processes and Python versions, unlike
  `hash`), 32 bits as Qdrant's sparse indices are uint32. Collisions at ~1e5 distinct terms:
  a handful, harmless.
- document value: BM25's term-frequency part, `tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl /
  avgdl))`, k1 = 1.2, b = 0.75, with a FIXED `avgdl` (chunks are bounded by the model's token
  window, so a constant is close to the true mean and a vector never depends on the rest of
  the corpus: an unchanged chunk keeps its sparse vector, like its dense one).
- IDF: not in the stored values. Qdrant applies it at query time when the sparse vector is
  declared with `modifier=Modifier.IDF` (collection statistics; local mode supports it),
  `idf = ln((N - df + 0.5) / (df + 0.5) + 1)`.
- query value: 1.0 per distinct query token (a repeated word counts once).
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections import Counter

K1 = 1.2
B = 0.75
AVGDL = 120.0  # tokens of this scheme in a typical chunk (measured on eval/corpus.jsonl)

_WORD = re.compile(r"[^\W_]+(?:_[^\W_]+)*|[^\W_]+", re.UNICODE)
_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+|[^\W\d_]+", re.UNICODE)
_STOP = """a an and are as at be but by for from has have if in into is it its of on or so such
that the their then there these this to was were will with which who whom you your we our not
no can do does than"""
STOPWORDS = frozenset(_STOP.split())


def _is_camel_case(word: str) -> bool:
    return word.isascii() and not (word.islower() or word.isupper())


def tokenize(text: str) -> list[str]:
    """Lower-cased words; identifiers also contribute their parts."""
    tokens: list[str] = []
    for word in _WORD.findall(unicodedata.normalize("NFKC", text)):
        parts = [
            p
            for chunk in word.split("_")
            # camelCase parts of ASCII identifiers; other words whole ("Café" stays one)
            for p in (_PART.findall(chunk) if _is_camel_case(chunk) else [chunk])
        ] or [word]
        lowered = [p.lower() for p in parts]
        if len(lowered) > 1:
            lowered.append(word.lower())
        tokens += [t for t in lowered if len(t) > 1 and t not in STOPWORDS]
    return tokens


def token_index(token: str) -> int:
    return zlib.crc32(token.encode("utf-8"))


def _aggregate(tokens: list[str]) -> Counter[int]:
    return Counter(token_index(t) for t in tokens)


def document_vector(
    text: str, avgdl: float = AVGDL, k1: float = K1, b: float = B
) -> tuple[list[int], list[float]]:
    """(indices, values) of a chunk: BM25 term-frequency saturation, no IDF."""
    tokens = tokenize(text)
    counts = _aggregate(tokens)
    norm = k1 * (1 - b + b * len(tokens) / avgdl)
    indices = sorted(counts)
    return indices, [counts[i] * (k1 + 1) / (counts[i] + norm) for i in indices]


def query_vector(text: str) -> tuple[list[int], list[float]]:
    """(indices, values) of a query: each distinct token once, weight 1 (IDF from Qdrant)."""
    indices = sorted(set(_aggregate(tokenize(text))))
    return indices, [1.0] * len(indices)
