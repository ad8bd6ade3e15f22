"""Plain BERT models from their own files: the NumPy (queries) and torch (documents) forward
passes must give sentence-transformers' own vectors and tokens, and must decline models they
do not reproduce."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llm_twin_features.domain import plain_bert
from llm_twin_features.domain.embedding import (
    BUNDLED_MODEL,
    Embedder,
    load_local_model,
    resolve_model_path,
)

QUERIES = [
    "how do I keep a vector database in sync with MongoDB?",
    "Dagster",
    "token " * 400,  # truncated at the model's 256 tokens, as sentence-transformers does
    "Café naïve 東京 🤔 set_pooling_include_prompt()",
]
# Documents of very different lengths in one call: several batches, each padded.
DOCUMENTS = [
    *QUERIES,
    "",
    "  leading and trailing spaces  ",
    "\n\n".join(f"Paragraph {i}: change data capture keeps Qdrant in sync." for i in range(30)),
    "def chunk(text, size):\n    return [text[i : i + size] for i in range(0, len(text), size)]",
    *(f"Chunk {i}: vector databases store embeddings. " * (i % 9 + 1) for i in range(20)),
]
INSTRUCTION = "Represent the code snippet for retrieval: "


def sentence_transformer(path: str):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, local_files_only=True, device="cpu")
    model.set_pooling_include_prompt(False)  # as `load_local_model` configures it
    return model


@pytest.fixture(scope="module")
def reference():
    return sentence_transformer(resolve_model_path(BUNDLED_MODEL))


def test_query_vectors_in_numpy_equal_sentence_transformers_ones(reference):
    light = plain_bert.load_numpy(resolve_model_path(BUNDLED_MODEL))
    assert light is not None and light.get_embedding_dimension() == 384
    expected = reference.encode(QUERIES, normalize_embeddings=True)
    assert np.abs(light.encode(QUERIES) - expected).max() < 1e-5


@pytest.mark.parametrize("instruction", [None, INSTRUCTION], ids=["plain", "instruction"])
def test_document_vectors_in_torch_equal_sentence_transformers_ones(reference, instruction):
    model = load_local_model(BUNDLED_MODEL)
    assert isinstance(model, plain_bert.TorchBert)
    options = {"prompt": instruction, "batch_size": 4, "normalize_embeddings": True}
    expected = reference.encode(DOCUMENTS, show_progress_bar=False, **options)
    ours = model.encode(DOCUMENTS, **options)
    assert ours.shape == expected.shape == (len(DOCUMENTS), 384)
    assert np.abs(ours - expected).max() < 1e-5
    # The instruction changes the vectors: it is not silently ignored.
    if instruction:
        assert np.abs(ours - model.encode(DOCUMENTS, batch_size=4)).max() > 1e-2


def model_copy(tmp_path: Path, changes: dict[str, dict]) -> Path:
    """A copy of the bundled model with keys of some of its JSON files changed."""
    directory = tmp_path / "model"
    shutil.copytree(resolve_model_path(BUNDLED_MODEL), directory)
    for name, change in changes.items():
        path = directory / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    return directory


@pytest.mark.parametrize("instruction", [None, INSTRUCTION], ids=["plain", "instruction"])
def test_cls_pooling_equals_sentence_transformers(tmp_path: Path, instruction):
    """With an instruction, sentence-transformers pools the first token after it."""
    modes = {"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}
    directory = model_copy(tmp_path, {"1_Pooling/config.json": modes})
    model = plain_bert.load_torch(str(directory))
    assert model is not None and model.pooling == "cls"
    options = {"prompt": instruction, "batch_size": 8}
    expected = sentence_transformer(str(directory)).encode(DOCUMENTS, **options)
    assert np.abs(model.encode(DOCUMENTS, **options) - expected).max() < 1e-5


def test_the_input_length_without_its_setting_is_the_tokenizers(tmp_path: Path):
    directory = model_copy(tmp_path, {"tokenizer_config.json": {"model_max_length": 128}})
    (directory / "sentence_bert_config.json").write_text(json.dumps({"do_lower_case": False}))
    model = plain_bert.load_torch(str(directory))
    reference = sentence_transformer(str(directory))
    assert model is not None and model.max_seq_length == reference.max_seq_length == 128
    expected = reference.encode(QUERIES, normalize_embeddings=True)
    assert np.abs(model.encode(QUERIES, normalize_embeddings=True) - expected).max() < 1e-5


def test_tokens_and_offsets_equal_sentence_transformers_ones(reference):
    """Chunking cuts texts at these offsets, and the model server serves them."""
    model = load_local_model(BUNDLED_MODEL)
    options = {"add_special_tokens": False, "return_offsets_mapping": True}
    expected = reference.tokenizer(DOCUMENTS, verbose=False, **options)
    ours = model.tokenizer(DOCUMENTS, **options)
    assert ours["input_ids"] == expected["input_ids"]  # never truncated
    assert [[tuple(s) for s in o] for o in ours["offset_mapping"]] == [
        [tuple(s) for s in o] for o in expected["offset_mapping"]
    ]
    assert (
        model.tokenizer(INSTRUCTION)["input_ids"] == reference.tokenizer(INSTRUCTION)["input_ids"]
    )
    assert model.max_seq_length == reference.max_seq_length
    reserved = len(reference.tokenizer(INSTRUCTION)["input_ids"])
    assert Embedder(BUNDLED_MODEL, INSTRUCTION).max_text_tokens == 256 - reserved


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (  # a query: no torch either
            "from llm_twin_features.domain import plain_bert; "
            "plain_bert.load_numpy(resolve_model_path(BUNDLED_MODEL)).encode(['hello']); ",
            ["False", "False"],
        ),
        (  # documents: torch, not sentence-transformers
            "from llm_twin_features.domain.embedding import Embedder; "
            "Embedder(BUNDLED_MODEL).embed(['hello', 'world']); ",
            ["True", "False"],
        ),
    ],
    ids=["query", "documents"],
)
def test_what_a_process_imports(code: str, expected: list[str]):
    code = (
        "import sys; from llm_twin_features.domain.embedding import BUNDLED_MODEL, "
        f"resolve_model_path; {code}"
        "print('torch' in sys.modules, 'sentence_transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == expected, result.stderr


def half_precision_weights(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(directory / "model.safetensors"))
    half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    save_file(half, str(directory / "model.safetensors"))


@pytest.mark.parametrize(
    "change",
    [
        lambda d: (d / "modules.json").write_text(json.dumps([{"type": "x.Custom"}])),
        lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "roberta"})
        ),
        lambda d: (d / "1_Pooling" / "config.json").write_text(
            json.dumps({"pooling_mode_max_tokens": True})
        ),
        lambda d: (d / "model.safetensors").unlink(),
        lambda d: (d / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": 256, "do_lower_case": True})
        ),
        # transformers rebuilds the normaliser from tokenizer_config.json, not tokenizer.json
        lambda d: (d / "tokenizer_config.json").write_text(
            json.dumps(
                {**json.loads((d / "tokenizer_config.json").read_text()), "do_lower_case": False}
            )
        ),
        lambda d: (d / "config_sentence_transformers.json").write_text(
            json.dumps({"prompts": {"query": "query: "}, "default_prompt_name": "query"})
        ),
        lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "torch_dtype": "float16"})
        ),
        half_precision_weights,
    ],
    ids=[
        "custom module",
        "not BERT",
        "max pooling",
        "no safetensors",
        "lower-cased",
        "tokenizer settings differ",
        "default instruction",
        "fp16 config",
        "fp16 weights",
    ],
)
def test_other_models_are_declined(tmp_path: Path, change):
    directory = tmp_path / "model"
    shutil.copytree(resolve_model_path(BUNDLED_MODEL), directory)
    change(directory)
    assert plain_bert.describe(str(directory)) is None
    assert plain_bert.load_numpy(str(directory)) is None
    assert plain_bert.load_torch(str(directory)) is None
