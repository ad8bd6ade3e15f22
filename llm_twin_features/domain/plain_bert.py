"""Plain BERT sentence-transformers run from their own files, without sentence-transformers.

Importing sentence-transformers costs a fresh process 4-6 s on top of torch (transformers,
scikit-learn, torch.distributed), and every model load paid it: the model server's start, a
backfill's first embedding, a run process that embeds. For the models this reproduces
exactly, a plain BERT encoder (absolute positions, GELU) with mean or CLS pooling and optional
normalisation (all-MiniLM-L6-v2 and most small sentence-transformers, bge-small included),
the model's own files (safetensors weights, `tokenizer.json`) are enough:

- `NumpyBert` embeds queries without torch (about 0.4 s to load): `search` without a model
  server;
- `TorchBert` embeds documents with torch ops, batched as sentence-transformers batches them
  (longest first, padded per batch): every local model load.

Both give sentence-transformers' own vectors to float32 precision, instructions included
(tests/unit/test_plain_bert.py). Any other model makes `describe` return None, and the caller
loads sentence-transformers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TRANSFORMER = "sentence_transformers.models.Transformer"
POOLING = "sentence_transformers.models.Pooling"
NORMALIZE = "sentence_transformers.models.Normalize"
FLOAT = ("F", "BF")  # safetensors' floating dtypes: F16, BF16, F32, F64
BERT_PREFIX = "bert."  # the tensors' prefix in checkpoints saved from a BertModel wrapper
# sentence_bert_config.json keys that change what the Transformer module does (beyond these two)
SENTENCE_BERT_KEYS = {"max_seq_length", "do_lower_case"}


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


@dataclass(frozen=True)
class PlainBert:
    """What `describe` read from a model folder that this module reproduces."""

    directory: Path
    config: dict
    pooling: str  # "mean" or "cls"
    normalize: bool
    max_seq_length: int

    def weights(self, load_file: Callable[[str], dict]) -> dict:
        """The encoder's tensors by name, with or without the `bert.` prefix in the file."""
        weights = load_file(str(self.directory / "model.safetensors"))
        return {key.removeprefix(BERT_PREFIX): value for key, value in weights.items()}

    def tokenizer(self, truncate: bool) -> Any:
        """The model's own fast tokenizer; `truncate`: at the model's input length."""
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(self.directory / "tokenizer.json"))
        tokenizer.no_padding()
        if truncate:
            tokenizer.enable_truncation(self.max_seq_length)
        else:
            tokenizer.no_truncation()
        return tokenizer


class _LoadedBert:
    """What both forward passes read from a `PlainBert`: its shape, pooling and weights."""

    def __init__(self, model: PlainBert, weights: dict) -> None:
        self.weights = weights
        self.layers = int(model.config["num_hidden_layers"])
        self.heads = int(model.config["num_attention_heads"])
        self.eps = float(model.config.get("layer_norm_eps", 1e-12))
        self.pooling = model.pooling
        self.normalize = model.normalize
        self.max_seq_length = model.max_seq_length

    def get_embedding_dimension(self) -> int:
        return int(self.weights["embeddings.word_embeddings.weight"].shape[1])


class NumpyBert(_LoadedBert):
    """The slice of the SentenceTransformer interface a query needs: `encode`."""

    def __init__(self, model: PlainBert) -> None:
        from safetensors.numpy import load_file

        super().__init__(model, model.weights(load_file))
        self.tokenizer = model.tokenizer(truncate=True)

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


class TokenizerCall:
    """The call of a Hugging Face fast tokenizer that chunking and the model server make:
    token ids and character offsets of a text or a list of texts, never truncated."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __call__(
        self,
        texts: str | list[str],
        add_special_tokens: bool = True,
        return_offsets_mapping: bool = False,
        **_: Any,
    ) -> dict[str, list]:
        single = isinstance(texts, str)
        encodings = self._tokenizer.encode_batch(
            [texts] if single else list(texts), add_special_tokens=add_special_tokens
        )
        result: dict[str, list] = {"input_ids": [e.ids for e in encodings]}
        if return_offsets_mapping:
            result["offset_mapping"] = [e.offsets for e in encodings]
        return {key: value[0] for key, value in result.items()} if single else result


class TorchBert(_LoadedBert):
    """The slice of the SentenceTransformer interface the pipeline uses, in plain torch ops.

    An instruction (`prompt`) is prepended to each text and its tokens ([CLS] included) are
    left out of mean pooling, as sentence-transformers does with
    `set_pooling_include_prompt(False)` (INSTRUCTOR's definition)."""

    def __init__(self, model: PlainBert) -> None:
        import torch
        from safetensors.torch import load_file

        super().__init__(model, model.weights(load_file))  # float32: `describe` sees to it
        self.device = torch.device("cpu")
        for layer in range(self.layers):  # one matrix product for query, key and value
            prefix = f"encoder.layer.{layer}.attention.self"
            for part in ("weight", "bias"):
                self.weights[f"{prefix}.qkv.{part}"] = torch.cat(
                    [
                        self.weights.pop(f"{prefix}.{name}.{part}")
                        for name in ("query", "key", "value")
                    ]
                )
        self.tokenizer = TokenizerCall(model.tokenizer(truncate=False))
        self._inputs = model.tokenizer(truncate=True)
        self._pad_id = int(model.config.get("pad_token_id") or 0)

    def encode(
        self,
        texts: list[str],
        prompt: str | None = None,
        batch_size: int = 32,
        normalize_embeddings: bool = False,
        **_: Any,
    ) -> np.ndarray:
        """Vectors of `texts` in order, as float32 NumPy rows."""
        import torch

        prompt_length = 0
        if prompt:
            # [CLS] and the instruction's tokens, without the trailing [SEP].
            prompt_length = len(self._inputs.encode(prompt).ids) - 1
            texts = [prompt + text for text in texts]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        vectors = np.empty((len(texts), self.get_embedding_dimension()), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                pooled = self._pooled([texts[i] for i in batch], prompt_length)
                if self.normalize or normalize_embeddings:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                vectors[batch] = pooled.numpy()
        return vectors

    def _pooled(self, texts: list[str], prompt_length: int) -> Any:
        import torch
        import torch.nn.functional as F

        encodings = self._inputs.encode_batch(texts)
        length = max(len(e.ids) for e in encodings)
        ids = torch.full((len(texts), length), self._pad_id, dtype=torch.long)
        types = torch.zeros((len(texts), length), dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        for row, encoding in enumerate(encodings):
            size = len(encoding.ids)
            ids[row, :size] = torch.tensor(encoding.ids)
            types[row, :size] = torch.tensor(encoding.type_ids)
            mask[row, :size] = 1
        w = self.weights
        hidden = self.get_embedding_dimension()
        size = hidden // self.heads

        def norm(x: Any, name: str) -> Any:
            return F.layer_norm(x, (hidden,), w[f"{name}.weight"], w[f"{name}.bias"], self.eps)

        def dense(x: Any, name: str) -> Any:
            return F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])

        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:length]
            + w["embeddings.token_type_embeddings.weight"][types]
        )
        x = norm(x, "embeddings.LayerNorm")
        keys = mask.bool()[:, None, None, :]  # padding is never attended to
        for layer in range(self.layers):
            prefix = f"encoder.layer.{layer}"
            qkv = dense(x, f"{prefix}.attention.self.qkv")
            q, k, v = (
                t.reshape(len(texts), length, self.heads, size).transpose(1, 2)
                for t in qkv.chunk(3, dim=-1)
            )
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
            context = context.transpose(1, 2).reshape(len(texts), length, hidden)
            x = norm(
                dense(context, f"{prefix}.attention.output.dense") + x,
                f"{prefix}.attention.output.LayerNorm",
            )
            inner = F.gelu(dense(x, f"{prefix}.intermediate.dense"))
            x = norm(dense(inner, f"{prefix}.output.dense") + x, f"{prefix}.output.LayerNorm")
        if self.pooling == "cls":  # the first token left after the instruction's
            return x[:, prompt_length]
        pooled_mask = mask.clone()
        pooled_mask[:, :prompt_length] = 0
        weights = pooled_mask.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def describe(directory: str) -> PlainBert | None:
    """The model at `directory` when it is one this module reproduces, else None."""
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
    bert_config = _read_json(path / "sentence_bert_config.json") or {}
    model_settings = _read_json(path / "config_sentence_transformers.json") or {}
    tokenizer_settings = _read_json(path / "tokenizer_config.json") or {}
    plain_bert = (
        config.get("model_type") == "bert"
        and config.get("hidden_act") == "gelu"
        and config.get("position_embedding_type", "absolute") == "absolute"
        # transformers runs a model in the precision its config names (fp16 even on a CPU)
        and config.get("torch_dtype", config.get("dtype")) in (None, "float32")
        and _float32_bert_weights(path / "model.safetensors")
        and modules[0].get("path", "") == ""
        and not bert_config.get("do_lower_case")  # lower-casing in the module, not the tokenizer
        and not any(bert_config.get(key) for key in set(bert_config) - SENTENCE_BERT_KEYS)
        # a default instruction or truncated vectors: sentence-transformers' own features
        and not model_settings.get("default_prompt_name")
        and not model_settings.get("truncate_dim")
        and _tokenizer_as_transformers_builds_it(path, tokenizer_settings)
    )
    if pooling is None or not plain_bert:
        return None
    max_seq_length = bert_config.get("max_seq_length") or min(
        int(tokenizer_settings.get("model_max_length") or config["max_position_embeddings"]),
        int(config["max_position_embeddings"]),
    )
    return PlainBert(path, config, pooling, len(types) == 3, int(max_seq_length))


def _float32_bert_weights(path: Path) -> bool:
    """Whether the safetensors file holds a BERT encoder in float32 (read from its header;
    integer buffers such as `position_ids` aside)."""
    try:
        with path.open("rb") as file:
            header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
    except (OSError, ValueError):
        return False
    tensors = {k.removeprefix(BERT_PREFIX): v for k, v in header.items() if k != "__metadata__"}
    floating = [t.get("dtype") for t in tensors.values() if str(t.get("dtype")).startswith(FLOAT)]
    return "embeddings.word_embeddings.weight" in tensors and set(floating) == {"F32"}


def _tokenizer_as_transformers_builds_it(path: Path, settings: dict) -> bool:
    """Whether `tokenizer.json` alone tokenizes as transformers does. transformers rebuilds a
    BERT tokenizer's normaliser and added tokens from `tokenizer_config.json`, so the two
    files must agree (they do in a folder that transformers saved itself)."""
    tokenizer = _read_json(path / "tokenizer.json")
    if not isinstance(tokenizer, dict):
        return False
    normalizer = tokenizer.get("normalizer") or {}
    expected = {
        "type": "BertNormalizer",
        "lowercase": settings.get("do_lower_case", True),
        "strip_accents": settings.get("strip_accents"),
        "handle_chinese_chars": settings.get("tokenize_chinese_chars", True),
    }
    added = {str(t.get("id")): t.get("content") for t in tokenizer.get("added_tokens") or []}
    declared = {
        key: value.get("content")
        for key, value in (settings.get("added_tokens_decoder") or {}).items()
        if isinstance(value, dict)
    }
    return (
        all(normalizer.get(key) == value for key, value in expected.items())
        and settings.get("tokenizer_class") in (None, "BertTokenizer", "BertTokenizerFast")
        and settings.get("do_basic_tokenize", True)
        and not settings.get("never_split")
        and settings.get("truncation_side", "right") == "right"
        and (not declared or declared == added)
    )


def load_numpy(directory: str) -> NumpyBert | None:
    """The model at `directory` in NumPy, or None when it is not one this reproduces."""
    model = describe(directory)
    return NumpyBert(model) if model else None


def load_torch(directory: str) -> TorchBert | None:
    """The model at `directory` in plain torch ops, or None when it is not one this
    reproduces or a GPU is there (sentence-transformers then runs it on the GPU)."""
    model = describe(directory)
    if model is None:
        return None
    import torch

    return None if torch.cuda.is_available() else TorchBert(model)
