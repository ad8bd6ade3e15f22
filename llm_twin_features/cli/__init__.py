"""`llm-twin-features`: one module per command group (documents, pipeline, search, audit,
services); this module builds the parser and turns store failures into one line."""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys

from llm_twin_features.cli.audit import cmd_audit, cmd_status
from llm_twin_features.cli.common import err
from llm_twin_features.cli.documents import cmd_delete, cmd_ingest
from llm_twin_features.cli.generations import cmd_generations
from llm_twin_features.cli.pipeline import cmd_backfill
from llm_twin_features.cli.search import cmd_search
from llm_twin_features.cli.services import cmd_cdc, cmd_dev, cmd_serve_models
from llm_twin_features.domain.data_types import data_types
from llm_twin_features.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-twin-features",
        description="Keep an LLM twin's Qdrant feature store in sync with its MongoDB warehouse.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser(
        "ingest", help="write JSONL documents into the warehouse and publish change events"
    )
    ingest.add_argument("files", nargs="+", metavar="FILE")
    ingest.add_argument("--no-publish", action="store_true", help="do not publish events")
    ingest.set_defaults(handler=cmd_ingest)

    delete = commands.add_parser(
        "delete", help="delete documents from the warehouse and publish change events"
    )
    delete.add_argument("ids", nargs="+", metavar="ID")
    delete.add_argument("--type", choices=data_types(), required=True)
    delete.add_argument("--no-publish", action="store_true", help="do not publish events")
    delete.set_defaults(handler=cmd_delete)

    cdc = commands.add_parser(
        "cdc", help="publish MongoDB change-stream events to RabbitMQ (needs a replica set)"
    )
    cdc.set_defaults(handler=cmd_cdc)

    backfill = commands.add_parser("backfill", help="rebuild features for data types via Dagster")
    backfill.add_argument("--type", choices=data_types())
    backfill.add_argument("--ids", nargs="+", metavar="ID", help="only these documents (--type)")
    backfill.add_argument(
        "--shards",
        type=int,
        metavar="N",
        help="split each data type's backfill into N runs over stable shards of its documents",
    )
    backfill.add_argument("--shard", metavar="I/N", help="run shard I (0-based) of N only")
    backfill.add_argument(
        "--force",
        action="store_true",
        help="run even for data types unchanged since their last complete sync",
    )
    backfill.set_defaults(handler=cmd_backfill)

    audit = commands.add_parser(
        "audit", help="compare the warehouse with every stage; exit 1 on drift"
    )
    audit.add_argument("--type", choices=data_types())
    audit.add_argument("--json", action="store_true", help="one JSON object per type")
    audit.add_argument("--repair", action="store_true", help="run the drifted documents again")
    audit.set_defaults(handler=cmd_audit)

    search = commands.add_parser("search", help="hybrid or semantic search over embedded chunks")
    search.add_argument("query", nargs="?", help="the query; omitted: one query per stdin line")
    search.add_argument("--type", choices=data_types(), help="search one data type only")
    search.add_argument("--limit", type=int, default=5)
    search.add_argument("--author", help="only chunks by this author id")
    search.add_argument("--json", action="store_true", help="one JSON object per result")
    search.add_argument(
        "--mode",
        choices=("hybrid", "dense"),
        default="hybrid",
        help="hybrid (default): dense and BM25 keyword matches fused by rank; dense: the "
        "embedding alone, as the course's retriever searches",
    )
    search.set_defaults(handler=cmd_search)

    serve_models = commands.add_parser(
        "serve-models", help="keep the embedding models loaded for pipeline runs"
    )
    serve_models.add_argument("--host", default="127.0.0.1")
    serve_models.add_argument("--port", type=int, default=8765)
    # For a helper server: stop when stdin ends, i.e. when the process that started it is gone.
    serve_models.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    serve_models.set_defaults(handler=cmd_serve_models)

    dev = commands.add_parser("dev", help="model server + Dagster UI, daemon and sensor")
    dev.add_argument("--port", type=int, default=3000)
    dev.set_defaults(handler=cmd_dev)

    generations = commands.add_parser(
        "generations",
        help="the model generations of each type's vectors: serving, building, retired",
    )
    generations.add_argument("--type", choices=data_types())
    generations.add_argument("--json", action="store_true", help="one JSON object per row")
    generations.add_argument(
        "--prune",
        action="store_true",
        help="remove the retired generations (neither serving nor the configured model's)",
    )
    generations.set_defaults(handler=cmd_generations)

    status = commands.add_parser("status", help="per-type counts and drift")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    try:
        return args.handler(args, settings)
    except (OSError, RuntimeError, ValueError) as error:
        err(f"error: {error}")
        return 1
    except sqlite3.Error as error:  # an embedded store's file, where no adapter said more
        err(
            f"error: a local store under {settings.resolved_data_dir} failed: {error}; free some "
            "disk space and check that the folder is writable, then run the command again"
        )
        return 1
    except Exception as error:
        if not type(error).__module__.startswith("sqlalchemy"):
            raise
        reason = str(getattr(error, "orig", None) or error).splitlines()[0]
        home = os.environ.get("DAGSTER_HOME") or settings.resolved_data_dir / "dagster_home"
        err(
            f"error: Dagster's storage under {home} failed: {reason}; free some disk space and "
            "check that DAGSTER_HOME is writable, then run the command again"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
