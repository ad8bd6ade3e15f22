"""Query vectors without torch: a BERT sentence-transformer's forward pass in NumPy.

A command that embeds one query (`search` without a model server) spent most of its time
importing torch and sentence-transformers (5-8 s) for a few milliseconds of compute. The
model's own files (safetensors weights, `tokenizer.json`) load with NumPy and `tokenizers`
in about 0.4 s instead. Only models this reproduces exactly are taken: a plain BERT encoder
(absolute positions, GELU) with mean or CLS pooling and optional normalisation, the shape of
all-MiniLM-L6-v2 and of most small sentence-transformers (bge-small included). The vectors
equal sentence-transformers' to float32 precision (tests/unit/test_numpy_bert.py). Anything
else returns None from `load`, and the caller loads sentence-transformers as before.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

TRANSFORMER = "sentence_transformers.models.Transformer"
POOLING = "sentence_transformers.models.Pooling"
NORMALIZE = "sentence_transformers.models.Normalize"


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + eps) * weight + bias


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to within 1.5e-7 (Abramowitz and Stegun 7.1.26), vectorised: NumPy has none."""
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU (with erf, not the tanh approximation)."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


class NumpyBert:
    """The slice of the SentenceTransformer interface a query needs: `encode`."""

    def __init__(self, directory: Path, config: dict, pooling: str, normalize: bool) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        self.weights = load_file(str(directory / "model.safetensors"))
        if not any(key.startswith("embeddings.") for key in self.weights):  # "bert." prefix
            self.weights = {k.split(".", 1)[1]: v for k, v in self.weights.items()}
        self.layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.pooling = pooling
        self.normalize = normalize
        bert_config = _read_json(directory / "sentence_bert_config.json") or {}
        self.max_seq_length = int(
            bert_config.get("max_seq_length") or config["max_position_embeddings"]
        )
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_seq_length)

    def get_embedding_dimension(self) -> int:
        return int(self.weights["embeddings.word_embeddings.weight"].shape[1])

    def _dense(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.weights[f"{name}.weight"].T + self.weights[f"{name}.bias"]

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        w = self.weights
        return _layer_norm(x, w[f"{name}.weight"], w[f"{name}.bias"], self.eps)

    def _vector(self, text: str) -> np.ndarray:
        encoding = self.tokenizer.encode(text)
        ids, types = np.array(encoding.ids), np.array(encoding.type_ids)
        w = self.weights
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][np.arange(len(ids))]
            + w["embeddings.token_type_embeddings.weight"][types]
        )
        x = self._norm(x, "embeddings.LayerNorm")
        size = x.shape[1] // self.heads
        for layer in range(self.layers):
            prefix = f"encoder.layer.{layer}"

            def heads(t: np.ndarray) -> np.ndarray:
                return t.reshape(len(ids), self.heads, size).transpose(1, 0, 2)

            q = heads(self._dense(x, f"{prefix}.attention.self.query"))
            k = heads(self._dense(x, f"{prefix}.attention.self.key"))
            v = heads(self._dense(x, f"{prefix}.attention.self.value"))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(size)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            context = (scores / scores.sum(-1, keepdims=True)) @ v
            context = context.transpose(1, 0, 2).reshape(len(ids), -1)
            attended = self._dense(context, f"{prefix}.attention.output.dense")
            x = self._norm(attended + x, f"{prefix}.attention.output.LayerNorm")
            hidden = _gelu(self._dense(x, f"{prefix}.intermediate.dense"))
            x = self._norm(
                self._dense(hidden, f"{prefix}.output.dense") + x, f"{prefix}.output.LayerNorm"
            )
        vector = x[0] if self.pooling == "cls" else x.mean(0)
        if self.normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        return vector.astype(np.float32)

    def encode(self, texts: list[str], prompt: str | None = None, **_: Any) -> np.ndarray:
        """Vectors of `texts` (no padding: one text at a time, as a query comes)."""
        if prompt:
            raise ValueError("NumpyBert encodes without instructions")
        return np.stack([self._vector(text) for text in texts])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load(directory: str) -> NumpyBert | None:
    """The model at `directory` in NumPy, or None when it is not one this reproduces."""
    path = Path(directory)
    modules = _read_json(path / "modules.json")
    config = _read_json(path / "config.json")
    if not isinstance(modules, list) or not isinstance(config, dict):
        return None
    types = [m.get("type") for m in modules]
    if types not in ([TRANSFORMER, POOLING], [TRANSFORMER, POOLING, NORMALIZE]):
        return None
    pooling_config = _read_json(path / modules[1].get("path", "") / "config.json") or {}
    modes = {k for k, v in pooling_config.items() if k.startswith("pooling_mode") and v}
    pooling = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}.get(
        next(iter(modes)) if len(modes) == 1 else ""
    )
    plain_bert = (
        config.get("model_type") == "bert"
        and config.get("hidden_act") == "gelu"
        and config.get("position_embedding_type", "absolute") == "absolute"
        and (path / "model.safetensors").exists()
        and (path / "tokenizer.json").exists()
        and modules[0].get("path", "") == ""
    )
    if pooling is None or not plain_bert:
        return None
    return NumpyBert(path, config, pooling, normalize=len(types) == 3)
