"""Errors raised by the trajectory buffer and its Redis lifecycle.

``BufferError`` deliberately shadows the rarely used builtin of the same name
inside this package: callers write ``except services.buffer.BufferError``.
"""

from __future__ import annotations

import re

_PASSWORD_IN_URL = re.compile(r"(rediss?://)([^@/]*)@")


def redact_url(url: str) -> str:
    """Hide the credentials of a Redis URL so that it can go into logs and errors."""
    return _PASSWORD_IN_URL.sub(lambda m: f"{m.group(1)}***@", url)


class BufferError(RuntimeError):  # noqa: A001 - the public name the services use
    """Base class of everything the buffer raises on purpose."""


class RedisUnavailableError(BufferError):
    """The Redis server cannot be reached (after retries with backoff) or failed to start."""


class RedisAuthError(BufferError):
    """The Redis server rejected the credentials in the URL."""


class BackpressureTimeout(BufferError):
    """A producer waited ``push_timeout_s`` for room in a full buffer."""
