"""Query vectors without torch: the NumPy forward pass must give sentence-transformers' own
vectors, and must decline models it does not reproduce."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llm_twin_features.domain import numpy_bert
from llm_twin_features.domain.embedding import BUNDLED_MODEL, load_local_model, resolve_model_path

QUERIES = [
    "how do I keep a vector database in sync with MongoDB?",
    "Dagster",
    "token " * 400,  # truncated at the model's 256 tokens, as sentence-transformers does
    "Café naïve 東京 🤔 set_pooling_include_prompt()",
]


def test_vectors_equal_sentence_transformers_ones():
    light = numpy_bert.load(resolve_model_path(BUNDLED_MODEL))
    assert light is not None and light.get_embedding_dimension() == 384
    expected = load_local_model(BUNDLED_MODEL).encode(QUERIES, normalize_embeddings=True)
    assert np.abs(light.encode(QUERIES) - expected).max() < 1e-5


def test_a_query_imports_no_torch():
    code = (
        "import sys; from llm_twin_features.domain import numpy_bert; "
        "from llm_twin_features.domain.embedding import BUNDLED_MODEL, resolve_model_path; "
        "numpy_bert.load(resolve_model_path(BUNDLED_MODEL)).encode(['hello']); "
        "print('torch' in sys.modules, 'sentence_transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False"], result.stderr


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
    ],
    ids=["custom module", "not BERT", "max pooling", "no safetensors"],
)
def test_other_models_are_declined(tmp_path: Path, change):
    directory = tmp_path / "model"
    shutil.copytree(resolve_model_path(BUNDLED_MODEL), directory)
    change(directory)
    assert numpy_bert.load(str(directory)) is None
