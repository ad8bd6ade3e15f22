"""`generations`: each data type's model generations of `vector_{type}`, and their pruning."""

from __future__ import annotations

import argparse
import json

from llm_twin_features.cli.common import feature_store_of
from llm_twin_features.domain.data_types import data_types
from llm_twin_features.settings import Settings


def cmd_generations(args: argparse.Namespace, settings: Settings) -> int:
    """Lists the generations (serving, building, retired); `--prune` removes the retired."""
    from llm_twin_features.pipeline import generations
    from llm_twin_features.pipeline.embedders import EmbeddingDispatcher

    chosen = [args.type] if args.type else list(data_types())
    rows = []
    with feature_store_of(settings) as store:
        for data_type in chosen:
            signature = EmbeddingDispatcher.embedder(data_type, settings).signature
            for generation in generations.generations(store, data_type, signature):
                rows.append(
                    {
                        "type": data_type,
                        "collection": generation.collection,
                        "role": generation.role,
                        "model": generation.model_signature or "(unrecorded)",
                        "points": generation.points,
                    }
                )
            if args.prune:
                for collection in generations.prune(store, data_type, signature):
                    print(f"{data_type}: removed retired generation {collection}")
    if args.json:
        for row in rows:
            print(json.dumps(row))
    elif rows:
        from llm_twin_features.cli.audit import print_table

        print_table(rows)
    else:
        print("no generations yet: run `llm-twin-features backfill`")
    return 0
