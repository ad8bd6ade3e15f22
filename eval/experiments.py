"""Where do we lose against the naive pipeline? Variants of the pipeline, measured on
eval/corpus.jsonl and eval/queries.jsonl, in process and by brute force.

The package is not edited: every variant calls its pure domain functions
(`llm_twin_features.domain.*`: the types' cleaning functions, `chunk_text`, the bundled model
as `load_local_model` loads it) with other arguments. Vectors are cached on disk
(eval/.work/embedding_cache.sqlite) by (prompt, text): a variant embeds only the chunks it
changes.

    .venv/bin/python eval/experiments.py              # every variant
    .venv/bin/python eval/experiments.py repro no-instruction hybrid   # some of them
    .venv/bin/python eval/experiments.py --list

"repro" reproduces the package's search: per type, the top 5 chunks of `vector_{type}` for the
query embedded as that type's query (repositories: with the code query instruction), merged by
score. Results: eval/.work/experiments.json, and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from common import (
    TYPES,
    WORK,
    CachedEmbedder,
    K,
    compact,
    corpus,
    first_rank,
    metrics,
    queries,
    save_json,
)

DOC_INSTRUCTION = "Represent the code snippet for retrieval:"  # settings.DEFAULT_CODE_INSTRUCTION
QUERY_INSTRUCTION = "Represent the question for retrieving relevant code:"


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    clean: str = "package"  # package | raw | no-urls | no-nfkc
    chunking: dict = field(default_factory=dict)  # type -> ChunkingConfig kwargs override
    code_instruction: bool = True
    context: str = "none"  # none | title: prefix title / file path to the embedded text
    merge: str = "score"  # score: per-type top 5 merged by score | scoped: own type only
    hybrid: str = "none"  # none | rrf
    rrf_k: int = 2
    sparse_weight: float = 1.0
    naive_tokens: bool = False  # LangChain SentenceTransformersTokenTextSplitter as the token step


# --- building chunks -------------------------------------------------------------------------


def clean_variant(kind: str) -> Callable[[str, dict], str]:
    from llm_twin_features.domain import cleaning
    from llm_twin_features.domain.data_types import spec_of

    if kind == "package":
        return lambda data_type, doc: spec_of(data_type).clean(doc["content"])
    if (
        kind == "raw"
    ):  # no cleaning: values joined by a blank line (repositories: path headers kept)

        def raw(data_type: str, doc: dict) -> str:
            content = doc["content"]
            if data_type == "repositories":
                content = {p: f"{p}\n{t}" for p, t in sorted(content.items())}
            return cleaning.join_content(content.values())

        return raw
    steps = {
        "no-urls": ("replace_urls", lambda text: text),
        "no-nfkc": ("normalize_unicode", lambda text: text),
        "no-tidy": ("tidy_spaces", lambda text: text),
    }
    name, stub = steps[kind]

    def patched(data_type: str, doc: dict) -> str:
        original = getattr(cleaning, name)
        setattr(cleaning, name, stub)  # clean_text looks the step up in the module
        try:
            return spec_of(data_type).clean(doc["content"])
        finally:
            setattr(cleaning, name, original)

    return patched


def build(variant: Variant, docs: list[dict], model) -> dict[str, dict]:
    """Per type: chunk texts (stored), embedded texts, doc ids."""
    from llm_twin_features.domain.chunking import ChunkingConfig, TokenWindow, chunk_text
    from llm_twin_features.domain.data_types import spec_of

    clean = clean_variant(variant.clean)
    out: dict[str, dict] = {}
    token_splitter = None
    if variant.naive_tokens:
        from common import bundled_model_path
        from langchain_text_splitters import SentenceTransformersTokenTextSplitter

        token_splitter = SentenceTransformersTokenTextSplitter(
            chunk_overlap=50, tokens_per_chunk=256, model_name=bundled_model_path()
        )
    for data_type in TYPES:
        spec = spec_of(data_type)
        config = spec.chunking.model_copy(update=variant.chunking.get(data_type, {}))
        instruction = (
            DOC_INSTRUCTION if data_type == "repositories" and variant.code_instruction else None
        )
        reserved = len(model.tokenizer(instruction or "")["input_ids"])
        window = TokenWindow(
            tokenizer=model.tokenizer, tokens_per_chunk=model.max_seq_length - max(reserved, 2)
        )
        texts, embedded, doc_ids = [], [], []
        for doc in (d for d in docs if d["type"] == data_type):
            cleaned = clean(data_type, doc)
            if token_splitter is not None:
                from langchain_text_splitters import RecursiveCharacterTextSplitter

                chars = RecursiveCharacterTextSplitter(
                    separators=config.separators,
                    chunk_size=config.chunk_size,
                    chunk_overlap=config.chunk_overlap,
                )
                chunks = [
                    c
                    for p in chars.split_text(cleaned)
                    for c in token_splitter.split_text(p)
                    if c.strip()
                ]
            else:
                chunks = chunk_text(cleaned, ChunkingConfig(**config.model_dump()), window)
            position = 0
            for chunk in chunks:
                prefix = ""
                if variant.context == "title":
                    if data_type == "articles":
                        prefix = f"{doc['content'].get('Title') or ''}\n"
                    elif data_type == "repositories":
                        found = cleaned.find(chunk[:200], position)
                        position = found if found >= 0 else position
                        headers = [
                            p
                            for p in doc["content"]
                            if cleaned.rfind(f"{p}\n", 0, position + 1) >= 0
                        ]
                        last = max(
                            headers,
                            key=lambda p: cleaned.rfind(f"{p}\n", 0, position + 1),
                            default="",
                        )
                        prefix = f"{doc['name']} {last}\n"
                texts.append(chunk)
                embedded.append(prefix + chunk)
                doc_ids.append(doc["_id"])
        out[data_type] = {
            "texts": texts,
            "embedded": embedded,
            "doc_ids": doc_ids,
            "instruction": instruction,
        }
    return out


# --- searching -------------------------------------------------------------------------------


class SparseIndex:
    """Brute-force BM25 over one type's chunks: the package's sparse vectors, IDF as Qdrant's
    Modifier.IDF computes it (per collection)."""

    def __init__(self, texts: list[str]) -> None:
        from scipy.sparse import csr_matrix

        from llm_twin_features.domain import sparse

        rows, cols, vals = [], [], []
        self.columns: dict[int, int] = {}
        for row, text in enumerate(texts):
            indices, values = sparse.document_vector(text)
            for index, value in zip(indices, values, strict=True):
                col = self.columns.setdefault(index, len(self.columns))
                rows.append(row)
                cols.append(col)
                vals.append(value)
        self.matrix = csr_matrix(
            (vals, (rows, cols)), shape=(len(texts), max(len(self.columns), 1))
        )
        df = np.bincount(cols, minlength=self.matrix.shape[1])
        n = len(texts)
        self.idf = np.log((n - df + 0.5) / (df + 0.5) + 1)

    def scores(self, query: str) -> np.ndarray:
        from llm_twin_features.domain import sparse

        indices, _ = sparse.query_vector(query)
        cols = [self.columns[i] for i in indices if i in self.columns]
        if not cols:
            return np.zeros(self.matrix.shape[0])
        return np.asarray(self.matrix[:, cols] @ self.idf[cols]).ravel()


def rrf(rankings: list[list[int]], k: int, weights: list[float]) -> dict[int, float]:
    """Qdrant's RRF: 1 / (position + k) per list, position 0-based; weights divide positions."""
    fused: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        for position, item in enumerate(ranking):
            fused[item] = fused.get(item, 0.0) + 1 / ((position + 1.0) / weight + k - 1.0)
    return fused


def evaluate(variant: Variant, docs: list[dict], qs: list[dict], embedder: CachedEmbedder) -> dict:
    started = time.perf_counter()
    built = build(variant, docs, embedder.model)
    query_texts = [q["query"] for q in qs]
    per_type = {}
    for data_type, b in built.items():
        vectors = embedder.embed(b["embedded"], prompt=b["instruction"])
        query_prompt = QUERY_INSTRUCTION if b["instruction"] else None
        query_vectors = embedder.embed(query_texts, prompt=query_prompt)
        scores = query_vectors @ vectors.T
        prefetch = 20  # candidates per source before fusion (a Prefetch limit)
        per_query = []
        sparse_index = SparseIndex(b["embedded"]) if variant.hybrid != "none" else None
        for qi, q in enumerate(qs):
            dense_top = np.argsort(-scores[qi])[:prefetch]
            if sparse_index is None:
                hits = [(float(scores[qi, j]), int(j)) for j in dense_top[:K]]
            else:
                sparse_scores = sparse_index.scores(q["query"])
                sparse_top = [
                    int(j) for j in np.argsort(-sparse_scores)[:prefetch] if sparse_scores[j] > 0
                ]
                fused = rrf(
                    [list(map(int, dense_top)), sparse_top],
                    variant.rrf_k,
                    [1.0, variant.sparse_weight],
                )
                ordered = sorted(fused.items(), key=lambda kv: (-kv[1], -scores[qi, kv[0]]))[:K]
                hits = [
                    (s + 1e-6 * float(scores[qi, j]), j) for j, s in ordered
                ]  # ties: dense score
            per_query.append([(s, b["doc_ids"][j], data_type) for s, j in hits])
        per_type[data_type] = per_query
    ranks = []
    for qi, q in enumerate(qs):
        if variant.merge == "scoped":
            hits = per_type[q["type"]][qi]
        else:
            hits = sorted((h for t in TYPES for h in per_type[t][qi]), key=lambda h: -h[0])[:K]
        ranks.append(first_rank([doc_id for _, doc_id, _ in hits], q["document_id"]))
    result = metrics(qs, ranks)
    result["_chunks"] = {t: len(b["texts"]) for t, b in built.items()}
    result["_seconds"] = round(time.perf_counter() - started, 1)
    result["_ranks"] = ranks
    # which type wins the top-1 slot when the answer is missed (cross-type competition)
    return result


NO_INSTR = dict(code_instruction=False)
VARIANTS = [
    Variant(
        "repro", "the package as configured (cleaning, chunking, code instruction, merge by score)"
    ),
    Variant("repro-scoped", "diagnostic: each query searched in its own type only", merge="scoped"),
    Variant("no-instruction", "code embedded and queried with no instruction", **NO_INSTR),
    Variant(
        "no-instr-scoped", "diagnostic: no instruction, own type only", merge="scoped", **NO_INSTR
    ),
    Variant(
        "no-clean",
        "no instruction; no cleaning at all (raw text, path headers kept)",
        clean="raw",
        **NO_INSTR,
    ),
    Variant(
        "no-url-repl", "no instruction; cleaning without URL -> [URL]", clean="no-urls", **NO_INSTR
    ),
    Variant(
        "no-nfkc",
        "no instruction; cleaning without NFKC/control-char step",
        clean="no-nfkc",
        **NO_INSTR,
    ),
    Variant(
        "code-500",
        "no instruction; repositories chunked like text (['\\n\\n'], 500 chars)",
        chunking={"repositories": {"separators": ["\n\n"], "chunk_size": 500}},
        **NO_INSTR,
    ),
    Variant(
        "overlap-100",
        "no instruction; 100 characters of overlap between character pieces (all types)",
        chunking={t: {"chunk_overlap": 100} for t in TYPES},
        **NO_INSTR,
    ),
    Variant(
        "context",
        "no instruction; title (articles) / repo name + file path (code) before the embedded text",
        context="title",
        **NO_INSTR,
    ),
    Variant(
        "hybrid",
        "no instruction; dense + BM25 sparse, RRF (k=2, Qdrant's default), per type, "
        "merged by fused score",
        hybrid="rrf",
        **NO_INSTR,
    ),
    Variant("hybrid-k60", "as hybrid, RRF k=60", hybrid="rrf", rrf_k=60, **NO_INSTR),
    Variant("hybrid+instr", "code instruction kept (as now) + hybrid", hybrid="rrf"),
    Variant(
        "hybrid+context",
        "no instruction; context prefix; hybrid",
        hybrid="rrf",
        context="title",
        **NO_INSTR,
    ),
    Variant(
        "hybrid-scoped",
        "diagnostic: hybrid, own type only",
        hybrid="rrf",
        merge="scoped",
        **NO_INSTR,
    ),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="variants to run (default: all)")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        for v in VARIANTS:
            print(f"{v.name:18} {v.description}")
        return 0
    chosen = [v for v in VARIANTS if not args.names or v.name in args.names]
    docs, qs = corpus(), queries()
    embedder = CachedEmbedder()
    path = WORK / "experiments.json"
    import json

    results = json.loads(path.read_text()) if path.exists() else {}
    for v in chosen:
        r = evaluate(v, docs, qs, embedder)
        results[v.name] = {"description": v.description, **r}
        print(
            f"{v.name}: {r['all']['recall@5']:.3f} / {r['all']['mrr']:.3f}"
            f"  ({r['_seconds']} s, chunks {r['_chunks']})",
            file=sys.stderr,
        )
        save_json(path, results)
    order = [v.name for v in VARIANTS if v.name in results]
    print(compact({n: results[n] for n in order}))
    print()
    for n in order:
        print(f"- {n}: {results[n]['description']} (chunks {results[n]['_chunks']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
