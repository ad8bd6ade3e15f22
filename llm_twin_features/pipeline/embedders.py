"""Which configured model embeds a data type: its declaration names a role (`text` or
`code`), the settings name the model and instructions of each role."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from llm_twin_features.domain.data_types import spec_of
from llm_twin_features.domain.embedding import (
    Embedder,
    encode_workers,
    load_query_model,
    loaded_models,
)
from llm_twin_features.settings import Settings
from llm_twin_features.stores.model_client import model_loader


class EmbeddingDispatcher:
    @staticmethod
    def model(data_type: str, settings: Settings) -> tuple[str, str | None]:
        """The model id and the instruction documents of `data_type` are embedded with."""
        if spec_of(data_type).embedding_role == "code":
            # Code goes through the INSTRUCTOR path: its own model, with an instruction.
            return settings.code_embedding_model, settings.code_embedding_instruction or None
        return settings.embedding_model, None

    @staticmethod
    def embedder(data_type: str, settings: Settings) -> Embedder:
        model_id, instruction = EmbeddingDispatcher.model(data_type, settings)
        return Embedder(
            model_id,
            instruction,
            settings.embedding_batch_size,
            encode_workers(settings.embedding_workers),
            model_loader(settings.embedding_service_url),
        )

    @staticmethod
    def query_instruction(data_type: str, settings: Settings) -> str | None:
        """The instruction queries for `data_type` are embedded with (None or "": none)."""
        if spec_of(data_type).embedding_role == "code":
            return settings.code_query_instruction  # "" means none (not the document's)
        return None


class QueryEncoder:
    """The query vectors a search needs, per data type: one encode per distinct model and
    query instruction (the bundled model serves every type: one encode, not three)."""

    def __init__(
        self,
        data_types: list[str],
        settings: Settings,
        models: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        """`models`: type -> (model id, query instruction) for types whose vectors another
        model than the configured one built (a model change not yet switched over)."""
        self._embedders = {t: EmbeddingDispatcher.embedder(t, settings) for t in data_types}
        self._instructions = {
            t: EmbeddingDispatcher.query_instruction(t, settings) or "" for t in data_types
        }
        for data_type, (model_id, instruction) in (models or {}).items():
            configured = self._embedders[data_type]
            self._embedders[data_type] = dataclasses.replace(
                configured, model_id=model_id, instruction=None
            )
            self._instructions[data_type] = instruction
        # Without a model server, a plain query to a BERT model is encoded in NumPy: the
        # first result comes seconds sooner than after importing torch (same vectors).
        self._light = not settings.embedding_service_url

    def vectors(self, query: str) -> dict[str, list[float]]:
        encoded: dict[tuple[str, str], list[float]] = {}
        vectors = {}
        for data_type, embedder in self._embedders.items():
            instruction = self._instructions[data_type]
            key = (embedder.model_id, instruction)
            if key not in encoded:
                encoded[key] = self._encode(embedder, query, instruction)
            vectors[data_type] = encoded[key]
        return vectors

    def _encode(self, embedder: Embedder, query: str, instruction: str) -> list[float]:
        light = None
        if self._light and not instruction and embedder.model_id not in loaded_models():
            light = load_query_model(embedder.model_id)
        if light is not None:
            return light.encode([query])[0].tolist()
        return embedder.embed([query], query_instruction=instruction)[0]
