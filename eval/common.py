"""Shared pieces of the retrieval eval: corpus and queries, metrics, a cached embedder and
brute-force search. No package code is changed: the experiments import the package's pure
domain functions and call them with variants."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"
CORPUS = HERE / "corpus.jsonl"
QUERIES = HERE / "queries.jsonl"
TYPES = ("posts", "articles", "repositories")
K = 5

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def corpus() -> list[dict]:
    return load_jsonl(CORPUS)


def queries() -> list[dict]:
    return load_jsonl(QUERIES)


# --- metrics ---------------------------------------------------------------------------------


def first_rank(ranked_doc_ids: Sequence[str], target: str, k: int = K) -> int | None:
    """Document-level rank (1-based) of the first result from `target` within the top k."""
    for rank, doc_id in enumerate(ranked_doc_ids[:k], start=1):
        if doc_id == target:
            return rank
    return None


def metrics(qs: list[dict], ranks: list[int | None]) -> dict:
    """recall@K and MRR@K overall, per type, per kind and per (type, kind)."""
    groups: dict[str, list[int | None]] = defaultdict(list)
    for q, rank in zip(qs, ranks, strict=True):
        for key in ("all", q["type"], q["kind"], f"{q['type']}/{q['kind']}"):
            groups[key].append(rank)
    return {
        key: {
            "n": len(rs),
            "recall@5": sum(r is not None for r in rs) / len(rs),
            "mrr": sum(1 / r for r in rs if r) / len(rs),
        }
        for key, rs in groups.items()
    }


ROWS = ("all", *TYPES, "exact", "paraphrase")


def table(results: dict[str, dict], rows: Iterable[str] = ROWS) -> str:
    """Markdown: one row per group, recall@5 / MRR columns per named result."""
    names = list(results)
    head = "| group | n | " + " | ".join(f"{n} R@5 | {n} MRR" for n in names) + " |"
    sep = "|---|---|" + "---|---|" * len(names)
    lines = [head, sep]
    for row in rows:
        cells = []
        n = None
        for name in names:
            m = results[name].get(row)
            if m is None:
                cells += ["", ""]
                continue
            n = m["n"]
            cells += [f"{m['recall@5']:.3f}", f"{m['mrr']:.3f}"]
        lines.append(f"| {row} | {n if n is not None else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compact(results: dict[str, dict], rows: Sequence[str] = ("all", *TYPES, "paraphrase")) -> str:
    """Markdown: one row per variant, `R@5 / MRR` per group."""
    lines = ["| variant | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for name, m in results.items():
        cells = [f"{m[r]['recall@5']:.3f} / {m[r]['mrr']:.3f}" if r in m else "" for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- embedding with a cache ------------------------------------------------------------------


def bundled_model_path() -> str:
    from llm_twin_features.domain.embedding import BUNDLED_MODEL, resolve_model_path

    return resolve_model_path(BUNDLED_MODEL)


class CachedEmbedder:
    """The bundled model (loaded as the package loads it), vectors cached on disk by
    (prompt, text), so experiment variants only embed the chunks they change."""

    def __init__(self, cache: Path = WORK / "embedding_cache.sqlite") -> None:
        from llm_twin_features.domain.embedding import BUNDLED_MODEL, load_local_model

        cache.parent.mkdir(parents=True, exist_ok=True)
        self.model = load_local_model(BUNDLED_MODEL)  # pooling excludes the prompt's tokens
        self.db = sqlite3.connect(cache)
        self.db.execute("CREATE TABLE IF NOT EXISTS v (k TEXT PRIMARY KEY, vec BLOB)")

    @staticmethod
    def key(text: str, prompt: str | None) -> str:
        return hashlib.md5(f"{prompt or ''}\x00{text}".encode()).hexdigest()

    def embed(self, texts: list[str], prompt: str | None = None, batch_size: int = 16):
        import numpy as np

        keys = [self.key(t, prompt) for t in texts]
        found: dict[str, bytes] = {}
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            marks = ",".join("?" * len(part))
            found.update(self.db.execute(f"SELECT k, vec FROM v WHERE k IN ({marks})", part))
        todo = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in found}.items())
        if todo:
            from llm_twin_features.domain.embedding import encode, encode_workers

            # the package's encode: normalised, one worker thread per core on a CPU
            texts_todo = [t for _, t in todo]
            vectors = encode(self.model, texts_todo, prompt, batch_size, encode_workers())
            vectors = vectors.astype("float32")
            rows = [(k, v.tobytes()) for (k, _), v in zip(todo, vectors, strict=True)]
            self.db.executemany("INSERT OR REPLACE INTO v VALUES (?, ?)", rows)
            self.db.commit()
            found.update(rows)
        return np.stack([np.frombuffer(found[k], dtype="float32") for k in keys])


def dense_rank(
    query_vectors, chunk_vectors, chunk_doc_ids: list[str], k: int = K
) -> list[list[str]]:
    """Top-k chunks per query by cosine (vectors are normalised), as document ids."""
    import numpy as np

    scores = query_vectors @ chunk_vectors.T
    top = np.argsort(-scores, axis=1)[:, :k]
    return [[chunk_doc_ids[j] for j in row] for row in top]


def save_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False))
