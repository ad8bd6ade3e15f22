"""What can be known about the feature store without opening it: the collection names, and a
token that changes whenever collections are written. Kept apart from `feature_store` so that
callers of these (a backfill finding nothing to do) import neither qdrant-client (most of a
second) nor load Qdrant local's points."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path


def cleaned_collection(data_type: str) -> str:
    return f"cleaned_{data_type}"


def vector_collection(data_type: str) -> str:
    return f"vector_{data_type}"


def state_token(
    qdrant_url: str | None, api_key: str | None, data_dir: Path, collections: Iterable[str]
) -> str | None:
    """A cheap token that changes whenever the given collections are written, read without
    opening the store (local mode's lock, and its loading of every point, cost more than
    the check is for). Local mode: size and modification time of each collection's SQLite
    files. Server mode: each collection's point count and vector size (a write that keeps
    both is not seen: `backfill --force` or the audit catch it). None: cannot tell."""
    parts = []
    for name in sorted(collections):
        if qdrant_url:
            info = _collection_info(qdrant_url, api_key, name)
            if info is None:
                return None
            parts.append(f"{name}:{info}")
            continue
        folder = data_dir / "qdrant" / "collection" / name
        for file in (folder / "storage.sqlite", folder / "storage.sqlite-wal"):
            try:
                stat = file.stat()
            except FileNotFoundError:
                parts.append(f"{name}/{file.name}:absent")
                continue
            parts.append(f"{name}/{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def _collection_info(qdrant_url: str, api_key: str | None, name: str) -> str | None:
    """`points_count` and vector config of a server collection over plain HTTP (importing
    qdrant-client costs most of a second), "absent" when it does not exist."""
    request = urllib.request.Request(f"{qdrant_url.rstrip('/')}/collections/{name}")
    if api_key:
        request.add_header("api-key", api_key)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            result = json.load(response)["result"]
    except urllib.error.HTTPError as error:
        return "absent" if error.code == 404 else None
    except (OSError, ValueError, KeyError):
        return None
    vectors = result.get("config", {}).get("params", {}).get("vectors")
    return f"{result.get('points_count')}:{json.dumps(vectors, sort_keys=True)}"
