"""The embedding path, including INSTRUCTOR checkpoints run through sentence-transformers."""

from pathlib import Path

import numpy as np
import pytest
import torch

from llm_twin_features.domain.embedding import (
    BUNDLED_MODEL,
    Embedder,
    encode_workers,
    resolve_model_path,
)
from llm_twin_features.settings import INSTRUCTOR_CODE_INSTRUCTION
from llm_twin_features.stores.model_client import load_model

INSTRUCTION = "Represent the code snippet for retrieval:"
CODE = "def chunk(text, size):\n    return [text[i : i + size] for i in range(0, len(text), size)]"


@pytest.fixture(scope="module")
def instructor_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An INSTRUCTOR-format checkpoint (Transformer, mean Pooling, Dense, Normalize, as in
    hkunlp/instructor-*) built offline from the bundled MiniLM, with an identity Dense layer."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Dense,
        Normalize,
        Pooling,
        Transformer,
    )

    base = resolve_model_path(BUNDLED_MODEL)
    modules = [
        Transformer(base),
        Pooling(384, pooling_mode="mean"),
        Dense(
            384,
            384,
            bias=False,
            activation_function=torch.nn.Identity(),
            init_weight=torch.eye(384),
        ),
        Normalize(),
    ]
    target = tmp_path_factory.mktemp("instructor-minilm")
    SentenceTransformer(modules=modules, device="cpu").save(str(target))
    return str(target)


def manual_instructor_embedding(model_dir: str, instruction: str, text: str) -> np.ndarray:
    """INSTRUCTOR's definition, computed with plain transformers: mean of the token embeddings
    of the text only ([CLS] and instruction tokens excluded), then the (identity) Dense, then
    L2 normalisation."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    encoded = tokenizer(instruction + text, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**encoded).last_hidden_state[0]
    instruction_positions = len(tokenizer(instruction)["input_ids"]) - 1  # [CLS] + instruction
    pooled = tokens[instruction_positions:].mean(dim=0)
    return (pooled / pooled.norm()).numpy()


def test_instruction_tokens_are_excluded_from_pooling(instructor_model_dir: str):
    embedder = Embedder(instructor_model_dir, INSTRUCTION)
    ours = np.array(embedder.embed([CODE])[0])
    expected = manual_instructor_embedding(instructor_model_dir, INSTRUCTION, CODE)
    assert np.allclose(ours, expected, atol=1e-5)

    # Pooling over the instruction too (what a plain model would do) gives another vector...
    model = load_model(instructor_model_dir)
    model.set_pooling_include_prompt(True)
    try:
        included = model.encode([CODE], prompt=INSTRUCTION, normalize_embeddings=True)[0]
    finally:
        model.set_pooling_include_prompt(False)
    assert not np.allclose(ours, included, atol=1e-3)
    # ...and the instruction still conditions the text tokens through attention.
    plain = np.array(Embedder(instructor_model_dir).embed([CODE])[0])
    assert not np.allclose(ours, plain, atol=1e-3)


def test_instruction_is_part_of_the_vector_signature():
    assert Embedder(BUNDLED_MODEL).signature == BUNDLED_MODEL
    with_instruction = Embedder(BUNDLED_MODEL, INSTRUCTION).signature
    assert with_instruction.startswith(BUNDLED_MODEL + "#instruction=")
    assert with_instruction != Embedder(BUNDLED_MODEL, "Represent the document:").signature


def test_one_model_instance_per_process():
    assert load_model(BUNDLED_MODEL) is load_model(BUNDLED_MODEL)
    assert Embedder(BUNDLED_MODEL).model is Embedder(BUNDLED_MODEL, INSTRUCTION).model


def test_batched_encoding_matches_one_by_one():
    embedder = Embedder(BUNDLED_MODEL, batch_size=4)
    texts = [f"Chunk {i}: vector databases store embeddings." * (i + 1) for i in range(9)]
    batched = np.array(embedder.embed(texts))
    single = np.array([embedder.embed([t])[0] for t in texts])
    assert batched.shape == (9, 384)
    assert np.allclose(batched, single, atol=1e-5)
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_parallel_workers_give_the_same_vectors_in_the_same_order():
    sentence = "parallel encode workers share the model. "
    texts = [f"Text {i}: " + sentence * (i % 7 + 1) for i in range(40)]
    single = np.array(Embedder(BUNDLED_MODEL, batch_size=4, workers=1).embed(texts))
    threads = torch.get_num_threads()
    parallel = np.array(Embedder(BUNDLED_MODEL, batch_size=4, workers=3).embed(texts))
    assert parallel.shape == single.shape == (40, 384)
    assert np.allclose(parallel, single, atol=1e-5)
    assert torch.get_num_threads() == threads  # the process keeps its torch threads


def test_encode_workers_default_to_the_usable_cores():
    assert encode_workers(3) == 3
    assert 1 <= encode_workers(0) <= 8


def test_bundled_model_resolves_to_a_local_directory():
    assert (Path(resolve_model_path(BUNDLED_MODEL)) / "modules.json").exists()


@pytest.mark.parametrize("model_id", ["BAAI/bge-small-en-v1.5", BUNDLED_MODEL])
def test_course_configuration_embeds_every_type_alike_with_no_instruction(monkeypatch, model_id):
    """README, "Replacing the original feature pipeline": the course's newest code embeds every
    type, code included, with one model and no instruction. EMBEDDING_MODEL and
    CODE_EMBEDDING_MODEL naming that model and an empty CODE_EMBEDDING_INSTRUCTION (and
    CODE_QUERY_INSTRUCTION, for our own search) give exactly that."""
    from llm_twin_features.domain.data_types import data_types
    from llm_twin_features.pipeline.embedders import EmbeddingDispatcher
    from llm_twin_features.settings import Settings

    monkeypatch.delenv("EMBEDDING_SERVICE_URL", raising=False)
    for name in ("EMBEDDING_MODEL", "CODE_EMBEDDING_MODEL"):
        monkeypatch.setenv(name, model_id)
    for name in ("CODE_EMBEDDING_INSTRUCTION", "CODE_QUERY_INSTRUCTION"):
        monkeypatch.setenv(name, "")
    settings = Settings()
    assert settings.code_embedding_instruction == settings.code_query_instruction == ""

    embedders = {t: EmbeddingDispatcher.embedder(t, settings) for t in data_types()}
    assert {e.model_id for e in embedders.values()} == {model_id}
    assert not any(e.instruction for e in embedders.values())
    # The vector signature (stored as each point's model_id) is the bare model id.
    assert {e.signature for e in embedders.values()} == {model_id}
    assert not any(EmbeddingDispatcher.query_instruction(t, settings) for t in data_types())
    if model_id != BUNDLED_MODEL:
        return  # no hub downloads here: the vectors are checked with the bundled model

    # Code vectors are the model's plain vectors: no prompt, for documents and for queries
    # (`search` passes `query_instruction or ""`), and a code chunk fits as many tokens.
    plain = load_model(BUNDLED_MODEL).encode([CODE], normalize_embeddings=True)[0]
    code = embedders["repositories"]
    query_instruction = EmbeddingDispatcher.query_instruction("repositories", settings) or ""
    assert np.allclose(code.embed([CODE])[0], plain, atol=1e-6)
    assert np.allclose(code.embed([CODE], query_instruction=query_instruction)[0], plain, atol=1e-6)
    assert code.max_text_tokens == embedders["posts"].max_text_tokens

    # An instruction (the INSTRUCTOR one) does change the code vectors: empty removes it.
    monkeypatch.setenv("CODE_EMBEDDING_INSTRUCTION", INSTRUCTOR_CODE_INSTRUCTION)
    instructed = EmbeddingDispatcher.embedder("repositories", Settings())
    assert instructed.signature != model_id
    assert not np.allclose(instructed.embed([CODE])[0], plain, atol=1e-3)
