"""Checks the qdrant-client calls hybrid search needs, in local mode (a temp folder): a
collection with the unnamed default dense vector AND a named sparse vector with
`Modifier.IDF`, upserts carrying both, and a query fusing a dense and a sparse prefetch by RRF.

    .venv/bin/python eval/qdrant_hybrid.py

Dense vectors here are random (the calls are the point, not the model); the sparse ones come
from eval/sparse.py. The same calls work against a Qdrant server (sparse vectors with the IDF
modifier: server >= 1.10; `FusionQuery`/`Prefetch`: >= 1.10).
"""

from __future__ import annotations

import tempfile

import numpy as np
import sparse
from qdrant_client import QdrantClient, models

SPARSE = "bm25"  # the named sparse vector; the dense vector stays unnamed ("")
TEXTS = [
    "The gpg-agent daemon handles all secret key material for OpenPGP and S/MIME.",
    "Ninja is a small build system with a focus on speed.",
    "Cairo exports a stateful rendering API similar to PostScript.",
    "The agent caches passphrases for gpg and ssh.",
]


def main() -> None:
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(len(TEXTS), 384)).astype("float32")
    with tempfile.TemporaryDirectory() as folder:
        client = QdrantClient(path=folder)
        client.create_collection(
            "vector_posts",
            vectors_config=models.VectorParams(size=384, distance=models.Distance.COSINE),
            sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
        )
        points = []
        for i, text in enumerate(TEXTS):
            indices, values = sparse.document_vector(text)
            points.append(
                models.PointStruct(
                    id=i,
                    vector={
                        "": dense[i].tolist(),  # the unnamed default dense vector
                        SPARSE: models.SparseVector(indices=indices, values=values),
                    },
                    payload={"content": text},
                )
            )
        client.upsert("vector_posts", points)

        query_text = "which agent keeps OpenPGP secret keys?"
        indices, values = sparse.query_vector(query_text)
        query_dense = (dense[0] + 0.5 * rng.normal(size=384)).tolist()
        sparse_only = client.query_points(
            "vector_posts",
            query=models.SparseVector(indices=indices, values=values),
            using=SPARSE,
            limit=3,
            with_payload=True,
        ).points
        print(
            "sparse only (IDF applied by Qdrant):", [(p.id, round(p.score, 3)) for p in sparse_only]
        )
        fused = client.query_points(
            "vector_posts",
            prefetch=[
                models.Prefetch(query=query_dense, limit=20),  # dense: `using` omitted = unnamed
                models.Prefetch(
                    query=models.SparseVector(indices=indices, values=values),
                    using=SPARSE,
                    limit=20,
                ),
            ],
            query=models.FusionQuery(fusion=models.Fusion.RRF),
            limit=3,
            with_payload=True,
        ).points
        print("dense + sparse, RRF:", [(p.id, round(p.score, 3)) for p in fused])
        rrf_k = client.query_points(
            "vector_posts",
            prefetch=[
                models.Prefetch(query=query_dense, limit=20),
                models.Prefetch(
                    query=models.SparseVector(indices=indices, values=values),
                    using=SPARSE,
                    limit=20,
                ),
            ],
            query=models.RrfQuery(rrf=models.Rrf(k=60)),
            limit=3,
        ).points
        print("RrfQuery(k=60):", [(p.id, round(p.score, 4)) for p in rrf_k])
        # a plain dense query still works unchanged (the course retriever's call)
        plain = client.query_points("vector_posts", query=query_dense, limit=2).points
        print("dense only (unnamed vector):", [p.id for p in plain])
        info = client.get_collection("vector_posts").config.params
        print("config:", info.vectors, info.sparse_vectors)
        client.close()


if __name__ == "__main__":
    main()
