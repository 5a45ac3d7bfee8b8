"""Fixtures of the cluster tests: a tiny model folder (session) shared by engines, replicas and servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.tiny import write_tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
