"""Embedder: the offline all-MiniLM-L6-v2 model (loaded once per session) and the http backend
against the fixture server's /v1/embeddings."""
from __future__ import annotations

import numpy as np
import pytest

from awm_core.llm.embed import Embedder, HttpEmbedder, OfflineEmbedder, cosine_matrix
from awm_core.llm.fixture_server import FixtureServer
from awm_core.settings import load_settings

TEXTS = [
    "A recipe box for saving, tagging and searching home cooking recipes",
    "An app to store cooking recipes, tag them and search by ingredient",
    "Corporate quarterly tax filing with invoices and VAT returns",
]


@pytest.fixture(scope="module")
def offline_vectors():
    return OfflineEmbedder().embed(TEXTS)


def test_llm_offline_embedder_similar_beats_unrelated(offline_vectors):
    v = offline_vectors
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sims = cosine_matrix(v, v)
    assert sims[0, 1] > 0.5
    assert sims[0, 1] > sims[0, 2] + 0.3 and sims[1, 0] > sims[1, 2] + 0.3


def test_llm_embedder_for_settings_picks_backend(awm_home, tmp_path, offline_vectors):
    settings = load_settings()
    assert isinstance(Embedder.for_settings(settings), OfflineEmbedder)
    assert Embedder.for_settings(settings).embed([]).shape == (0, 384)
    with pytest.raises(TypeError):
        Embedder.for_settings(settings).embed("one string")
    with FixtureServer(tmp_path) as srv:
        settings.llm.embedder = srv.role_settings(model="all-MiniLM-L6-v2")
        emb = Embedder.for_settings(settings)
        assert isinstance(emb, HttpEmbedder)
        got = emb.embed(TEXTS)
    assert np.allclose(got, offline_vectors, atol=1e-5)
    assert [r.path for r in srv.requests] == ["/v1/embeddings"]


def test_llm_cosine_matrix_shapes():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    got = cosine_matrix(a, b)
    assert got.shape == (2, 3)
    assert np.allclose(got, [[1.0, 2 ** -0.5, 0.0], [0.0, 2 ** -0.5, -1.0]])
    with pytest.raises(ValueError):
        cosine_matrix(a, np.ones((1, 3)))


def test_preload_loads_the_offline_model_in_the_background_and_only_that(awm_home, monkeypatch):
    from awm_core.llm import embed

    monkeypatch.setenv("AWM_LLM__EMBEDDER__BACKEND", "http")
    monkeypatch.setenv("AWM_LLM__EMBEDDER__BASE_URL", "http://127.0.0.1:9/v1")
    assert embed.preload(load_settings()) is None
    monkeypatch.setenv("AWM_LLM__EMBEDDER__BACKEND", "offline")
    thread = embed.preload(load_settings())
    assert thread is not None and thread.daemon
    thread.join(120)
    assert not thread.is_alive() and embed._offline_model is not None
