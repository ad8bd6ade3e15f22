"""Stable shards of a data type's documents, so that one partition's backfill can be split
into runs that a run launcher spreads over workers: a document belongs to shard
`hash(id) mod N`, the same in every process and run, so the shards of a partition cover each
document exactly once."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_SPEC = re.compile(r"^(\d+)/(\d+)$")


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    count: int

    @classmethod
    def parse(cls, spec: str) -> Shard:
        """`"I/N"`: shard I (0-based) of N."""
        match = _SPEC.match(spec.strip())
        if not match:
            raise ValueError(f"a shard is written I/N with 0 <= I < N, not {spec!r}")
        shard = cls(int(match[1]), int(match[2]))
        if not 0 <= shard.index < shard.count:
            raise ValueError(f"a shard is written I/N with 0 <= I < N, not {spec!r}")
        return shard

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, document_id: str) -> bool:
        digest = hashlib.blake2b(document_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index

    @classmethod
    def all_of(cls, count: int) -> list[Shard]:
        return [cls(index, count) for index in range(count)]
