"""Shared fixtures: tiny jina-embeddings-v4 checkpoints and their nova conversion, built once per session.

Tests import the tools as ``nova_embeddings.tiny`` / ``nova_embeddings.convert`` with the repository root
on sys.path (also where ``configuration_nova_embeddings_v1`` lives), installed or not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from nova_embeddings.convert import convert  # noqa: E402
from nova_embeddings.tiny import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_jina_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny jina repository as jina ships it: 4.x key names, two shards + index, adapters/ (float32)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_jina_4x"), layout="4x", seed=0, adapters=True)


@pytest.fixture(scope="session")
def tiny_jina_dir_5x(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny jina repository with transformers 5.x key names in one model.safetensors, no index, no adapters."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_jina_5x"), layout="5x", seed=0, adapters=False)


@pytest.fixture(scope="session")
def tiny_nova_dir(tiny_jina_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_jina_dir converted to a nova-embeddings-v1 repository (float32, as the source)."""
    out = tmp_path_factory.mktemp("tiny_nova")
    convert(tiny_jina_dir, out)
    return out
