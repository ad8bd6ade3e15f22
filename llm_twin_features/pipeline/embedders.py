"""Which configured model embeds a data type: its declaration names a role (`text` or
`code`), the settings name the model and instructions of each role."""

from __future__ import annotations

from llm_twin_features.domain.data_types import spec_of
from llm_twin_features.domain.embedding import Embedder, encode_workers
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
        if spec_of(data_type).embedding_role == "code":
            return settings.code_query_instruction  # "" means none (not the document's)
        return None
