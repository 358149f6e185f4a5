"""Trajectory buffer on Redis Streams, and the embedded Redis server it defaults to (issue 3)."""

from services.buffer.errors import (
    BackpressureTimeout,
    BufferError,
    RedisAuthError,
    RedisUnavailableError,
    redact_url,
)
from services.buffer.redis_server import EmbeddedRedis, connect_redis, find_redis_server, resolve_redis
from services.buffer.trajectory_buffer import COUNTERS, Delivery, TrajectoryBuffer

__all__ = [
    "COUNTERS",
    "BackpressureTimeout",
    "BufferError",
    "Delivery",
    "EmbeddedRedis",
    "RedisAuthError",
    "RedisUnavailableError",
    "TrajectoryBuffer",
    "connect_redis",
    "find_redis_server",
    "redact_url",
    "resolve_redis",
]
