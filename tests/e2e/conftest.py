"""Fixtures of the end-to-end tests: one real cluster per test session (``cluster``), and the
model cache every cluster of the session shares. The helpers behind them are in ``cluster.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from .cluster import ClusterHandle, started_cluster


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, model_cache) -> ClusterHandle:
    handle = started_cluster(tmp_path_factory.mktemp("run"), model_cache)
    yield handle
    handle.launcher("down")  # idempotent; test_lifecycle checks on a cluster of its own that it stops everything
