"""Shared fixtures. Heavy parts (Redis server, Ray, the vLLM engine) are started once per session."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Component fixtures live next to each other, one module per component.
pytest_plugins = [
    "tests.fixtures.ray_fixtures",
    "tests.fixtures.redis_fixtures",
    "tests.fixtures.serving_fixtures",
]
