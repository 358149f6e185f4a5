"""Fault tests own a redis-server: they pause and restart it, which would disturb the shared one."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def fault_redis(tmp_path_factory):
    from services.buffer import EmbeddedRedis

    with EmbeddedRedis(data_dir=tmp_path_factory.mktemp("fault-redis"), appendfsync="always") as server:
        yield server


@pytest.fixture
def fault_env(tmp_path, fault_redis, policy_app):
    yield tmp_path, fault_redis, policy_app
    policy_app.restore_initial()
