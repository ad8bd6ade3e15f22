"""Environment configuration, one place for every variable `.env.example` documents.

Unset store URLs select the embedded defaults (montydb warehouse, qdrant local mode) under
`LLM_TWIN_DATA_DIR`, so the same code runs on a laptop and against real servers.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from llm_twin_features.domain.embedding import BUNDLED_MODEL, DEFAULT_BATCH_SIZE
from llm_twin_features.domain.validation import DEFAULT_MAX_DOCUMENT_CHARS
from llm_twin_features.stores.queue import BrokerConfig

# The instructions of the lesson's code model, `hkunlp/instructor-xl` (set them with it). The
# default code model, all-MiniLM-L6-v2, was not trained for instructions: with them, code
# retrieved worse on the eval (recall@5 0.872 -> 0.895 without, repositories alone), so by
# default code is embedded and queried plainly.
INSTRUCTOR_CODE_INSTRUCTION = "Represent the code snippet for retrieval:"
INSTRUCTOR_QUERY_INSTRUCTION = "Represent the question for retrieving relevant code:"


class Settings(BaseSettings):
    """Read once per process; every field maps to an environment variable of the same name."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", populate_by_name=True)

    mongo_uri: str | None = Field(default=None, repr=False)  # may hold a password
    mongo_database: str = "twin"
    features_database: str = "twin_features"
    qdrant_url: str | None = None
    qdrant_api_key: SecretStr | None = None
    data_dir: Path = Field(
        default=Path(".data"), validation_alias=AliasChoices("LLM_TWIN_DATA_DIR", "data_dir")
    )
    embedding_model: str = BUNDLED_MODEL
    code_embedding_model: str = BUNDLED_MODEL
    code_embedding_instruction: str = ""
    code_query_instruction: str = ""
    # Texts per encode batch: 16 is fastest on a CPU (less padding); a GPU wants 64-256.
    embedding_batch_size: int = DEFAULT_BATCH_SIZE
    # Parallel encode workers (one torch thread each) for a local model on a CPU; 0: one per
    # core, at most 8. A GPU or the model server's clients ignore it.
    embedding_workers: int = Field(default=0, ge=0)
    # The scheduled audit (cron) and how many drifted ids of a type one repair run takes.
    audit_cron: str = "*/10 * * * *"
    audit_repair_cap: int = 500
    # A document with more text is quarantined instead of embedded (~2,000 chunks).
    max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS
    # The model server (`llm-twin-features serve-models`); unset: runs load models themselves.
    embedding_service_url: str | None = None
    # Without a laptop stack, a backfill leaves a run server behind (cli/run_server.py) that
    # takes the next commands' runs warm, until idle this long; 0: never start one.
    run_server_idle_seconds: float = Field(default=600.0, ge=0)

    # Change events (RabbitMQ). Unset user/password: the broker's default local account.
    rabbitmq_host: str = BrokerConfig.host
    rabbitmq_port: int = BrokerConfig.port
    rabbitmq_user: str | None = None
    rabbitmq_password: SecretStr | None = None
    rabbitmq_vhost: str = BrokerConfig.vhost
    rabbitmq_queue: str = BrokerConfig.queue
    # Change-event sensors taking turns on the queue (defs/sensors.py, `build_sensors`): with
    # one, an event landing after a tick ended early waits up to 5 s for the next tick.
    sensor_consumers: int = Field(default=2, ge=1)
    sensor_interval_seconds: int = 1
    sensor_max_events: int = 500
    sensor_time_budget_seconds: float = 10.0
    # A tick waits this long for a first event. Dagster's sensor loop starts a tick every 5 s
    # at best: a tick that waits for most of them leaves an event little time between ticks.
    sensor_long_poll_seconds: float = 4.8
    # Once events flow, a tick keeps reading until none came for this long (bursts batch up:
    # a producer's burst comes milliseconds apart; each 0.1 s here is 0.1 s of every event).
    sensor_settle_seconds: float = 0.1

    @cached_property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    def qdrant_api_key_value(self) -> str | None:
        return self.qdrant_api_key.get_secret_value() if self.qdrant_api_key else None

    def fingerprint(self) -> str:
        """Every field's value that runs read, secrets included, hashed: another process
        serves this one's commands only with the same configuration (the run server)."""
        values = {}
        for name in type(self).model_fields.keys() - {"run_server_idle_seconds"}:
            value = getattr(self, name)
            values[name] = value.get_secret_value() if isinstance(value, SecretStr) else value
        values["data_dir"] = self.resolved_data_dir
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()

    def search_identity(self) -> str:
        """What a search answered by another process (the laptop stack's model server) must
        share with the caller: the feature store and the models and instruction of queries."""
        return "|".join(
            (
                str(self.resolved_data_dir),
                self.qdrant_url or "",
                self.embedding_model,
                self.code_embedding_model,
                self.code_query_instruction,
            )
        )

    def broker_config(self) -> BrokerConfig:
        password = self.rabbitmq_password.get_secret_value() if self.rabbitmq_password else None
        return BrokerConfig(
            host=self.rabbitmq_host,
            port=self.rabbitmq_port,
            user=self.rabbitmq_user,
            password=password,
            vhost=self.rabbitmq_vhost,
            queue=self.rabbitmq_queue,
        )
