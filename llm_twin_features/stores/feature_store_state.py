"""What can be known about the feature store without opening it: the collection names, and a
token that changes whenever collections are written. Kept apart from `feature_store` so that
callers of these (a backfill finding nothing to do) import neither qdrant-client (most of a
second) nor load Qdrant local's points."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

GENERATION_SEPARATOR = "__"


def cleaned_collection(data_type: str) -> str:
    return f"cleaned_{data_type}"


def vector_collection(data_type: str) -> str:
    """The name search reads: an alias of the serving generation (`generation_collection`)."""
    return f"vector_{data_type}"


def generation_collection(data_type: str, model_signature: str) -> str:
    """The collection that holds one model's vectors of `data_type`: one per model signature,
    so that a model change builds a new one beside the one search reads."""
    digest = hashlib.sha256(model_signature.encode()).hexdigest()[:12]
    return f"{vector_collection(data_type)}{GENERATION_SEPARATOR}{digest}"


def is_generation_of(collection: str, data_type: str) -> bool:
    return collection.startswith(vector_collection(data_type) + GENERATION_SEPARATOR)


def state_token(
    qdrant_url: str | None, api_key: str | None, data_dir: Path, collections: Iterable[str]
) -> str | None:
    """A cheap token that changes whenever the given collections (or an alias among them) are
    written, read without opening the store (local mode's lock, and its loading of every
    point, cost more than the check is for). Local mode: the collection each alias names
    (from the store's `meta.json`), and size and modification time of each collection's
    SQLite files, a `vector_{type}` alias standing for all its generations. Server mode: the
    aliases, and each collection's point count and vector size (a write that keeps both is
    not seen: `backfill --force` or the audit catch it). None: cannot tell."""
    if qdrant_url:
        return _server_token(qdrant_url, api_key, collections)
    root = data_dir / "qdrant"
    try:
        aliases = json.loads((root / "meta.json").read_text()).get("aliases", {})
    except FileNotFoundError:
        aliases = {}
    except (OSError, ValueError):
        return None
    parts = []
    folders = root / "collection"
    present = sorted(p.name for p in folders.iterdir()) if folders.is_dir() else []
    for name in sorted(collections):
        parts.append(f"{name}->{aliases.get(name, '')}")
        for folder in [name, *(f for f in present if f.startswith(name + GENERATION_SEPARATOR))]:
            for file in ("storage.sqlite", "storage.sqlite-wal"):
                parts.append(_file_token(folders / folder / file))
    return "|".join(parts)


def _file_token(file: Path) -> str:
    try:
        stat = file.stat()
    except FileNotFoundError:
        stat = None
    if stat is None or stat.st_size == 0:  # an emptied write-ahead log is as good as none
        return f"{file.parent.name}/{file.name}:absent"
    return f"{file.parent.name}/{file.name}:{stat.st_size}:{stat.st_mtime_ns}"


def _server_token(qdrant_url: str, api_key: str | None, collections: Iterable[str]) -> str | None:
    aliases = _get_json(qdrant_url, api_key, "/aliases")
    if aliases is None:
        return None
    targets = {a["alias_name"]: a["collection_name"] for a in aliases.get("aliases", [])}
    parts = [json.dumps(targets, sort_keys=True)]
    for name in sorted(collections):
        info = _collection_info(qdrant_url, api_key, targets.get(name, name))
        if info is None:
            return None
        parts.append(f"{name}:{info}")
    return "|".join(parts)


def _collection_info(qdrant_url: str, api_key: str | None, name: str) -> str | None:
    """`points_count` and vector config of a server collection, "absent" when it does not
    exist."""
    try:
        result = _get_json(qdrant_url, api_key, f"/collections/{name}")
    except FileNotFoundError:
        return "absent"
    if result is None:
        return None
    vectors = result.get("config", {}).get("params", {}).get("vectors")
    return f"{result.get('points_count')}:{json.dumps(vectors, sort_keys=True)}"


def _get_json(qdrant_url: str, api_key: str | None, path: str) -> dict | None:
    """A Qdrant REST result over plain HTTP (importing qdrant-client costs most of a second);
    None on failure, FileNotFoundError on 404."""
    request = urllib.request.Request(f"{qdrant_url.rstrip('/')}{path}")
    if api_key:
        request.add_header("api-key", api_key)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["result"]
    except urllib.error.HTTPError as error:
        if error.code == 404:
            raise FileNotFoundError(path) from error
        return None
    except (OSError, ValueError, KeyError):
        return None
