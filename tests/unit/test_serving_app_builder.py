"""The RayService import path (services.serving.app:app_builder) exists and fails clearly."""

from __future__ import annotations

import importlib

import pytest


def test_import_path_of_the_rayservice_resolves():
    module, attr = "services.serving.app:app_builder".split(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from services.serving.app import app_builder

    with pytest.raises(FileNotFoundError, match="no Hugging Face model folder"):
        app_builder({"checkpoint": str(tmp_path / "missing")})


def test_bad_config_is_a_clear_error(tmp_path):
    from services.config import ConfigError
    from services.serving.app import app_builder

    bad = tmp_path / "c.yaml"
    bad.write_text("serving: {replicas: 3}\n")
    with pytest.raises(ConfigError, match="unknown key"):
        app_builder({"config": str(bad)})
