"""In-process checks of the LlamaIndex embedding class (no HTTP)."""

from __future__ import annotations

import numpy as np
import pytest

from app.config import Settings
from app.embedding import MAX_LENGTH, OnnxMiniLMEmbedding


@pytest.fixture(scope="module")
def model():
    return OnnxMiniLMEmbedding(Settings.from_env().model_dir, embed_batch_size=4)


def test_llamaindex_interface(model):
    q = np.array(model.get_query_embedding("a red bicycle"))
    t = np.array(model.get_text_embedding("a crimson bike"))
    far = np.array(model.get_text_embedding("tax law"))
    assert q.shape == (384,)
    assert abs(np.linalg.norm(q) - 1) < 1e-4 and abs(np.linalg.norm(t) - 1) < 1e-4
    assert q @ t > q @ far


def test_padding_does_not_change_vectors(model):
    short = "bike"
    long = "a much longer sentence that forces a lot of padding onto the short one " * 3
    alone = np.array(model.get_text_embedding(short))
    with_long = np.array(model.get_text_embedding_batch([long, short])[1])
    assert alone @ with_long > 0.9999


def test_truncation_to_max_length(model):
    vecs, tokens = model.embed_with_usage(["word " * 1000, "two words"])
    assert tokens[0] == MAX_LENGTH
    assert tokens[1] == 4  # [CLS] two words [SEP]
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
