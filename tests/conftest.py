"""Shared fixtures: tiny real checkpoints written to temporary folders."""

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from model_factory import TinyModelSpec, make_model  # noqa: E402


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """Keep transformers from reaching for the network in any test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def package_logging():
    """Undo the handlers and propagation that an in-process CLI run sets, so caplog receives every record."""
    logger = logging.getLogger("lowmem_moe")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny float32 Llama base with untied embeddings."""
    return make_model(tmp_path_factory.mktemp("base") / "base", TinyModelSpec(), seed=0)


@pytest.fixture(scope="session")
def tiny_experts(tmp_path_factory, tiny_llama) -> list[Path]:
    """Three experts that share the base's attention and embeddings but have their own MLPs."""
    root = tmp_path_factory.mktemp("experts")
    return [make_model(root / f"expert{i}", TinyModelSpec(), seed=0, mlp_seed=100 + i) for i in range(3)]
