"""The config tree: YAML + dotted overrides, validated once, with clear errors (issue 6, issue 9 corpus)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.config import ConfigError, TrainConfig, apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "deploy" / "configs").glob("*.yaml"))


def test_defaults_validate():
    cfg = load_config(None)
    assert isinstance(cfg, TrainConfig)
    assert cfg.algorithm.estimator == "proxmo"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_load(path):
    cfg = load_config(path)
    assert cfg.run_name


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["learner.lr=1e-5", "mode=async", "algorithm.estimator=gigpo", "rollout.num_workers=2"])
    assert cfg.learner.lr == pytest.approx(1e-5)
    assert cfg.mode == "async" and cfg.algorithm.estimator == "gigpo" and cfg.rollout.num_workers == 2


# The bad-input corpus for configs: each must fail with a message naming the field.
BAD = [
    (["env.reward=points"], "env.reward"),
    (["learner.lrr=1"], "unknown key"),
    (["nosuchsection.x=1"], "unknown key"),
    (["learner.lr=fast"], "learner.lr"),
    (["learner.groups_per_batch=1.5"], "learner.groups_per_batch"),
    (["rollout.num_workers=true"], "rollout.num_workers"),
    (["learner"], "key.path=value"),
    (["mode=sometimes"], "mode must be"),
    (["env.action_projection=closest"], "env.action_projection must be"),
    (["env.action_format=letter"], "env.action_format must be"),
    (["sampling.temperature=0.7"], "needs serving.logprobs_mode=processed_logprobs"),
    (["sampling.temperature=0"], "sampling.temperature must be > 0"),
    (["sampling.top_p=0.9", "serving.logprobs_mode=processed_logprobs"], "cannot reproduce the top-p cut"),
    (["env.projection_min_ratio=1.5"], "env.projection_min_ratio must be in"),
    (["learner.lr=-1"], "learner.lr"),
    (["rollout.min_workers=3", "rollout.num_workers=2"], "min_workers"),
    (["serving.min_replicas=4", "serving.max_replicas=2"], "min_replicas"),
    (["buffer.max_depth=2", "learner.groups_per_batch=8"], "buffer.max_depth"),
    (["buffer.url=http://example"], "buffer.url"),
    (["algorithm.temperature=0"], "algorithm.temperature"),
    (["serving.gpu_memory_utilization=0.95"], "gpu_memory_utilization"),
    (["sampling.max_tokens=600", "model.max_model_len=512"], "max_model_len"),
    (["mode=async", "max_policy_lag=3", "buffer.max_staleness=1"], "max_staleness"),
    (["loss.dual_clip=0.5"], "dual_clip"),
    (["model.tiny_heads=3"], "tiny_heads"),
    (["model.tiny_hidden=6", "model.tiny_heads=2"], "even head size"),
    (["model.tiny_layers=0"], "tiny_layers"),
    (["learner.freeze=embed_tokens,,lm_head"], "learner.freeze"),
    (["sft.demo_noise=1.0"], "sft.demo_noise"),
    (["env.now_chars=-1"], "env.now_chars"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_configs_fail_clearly(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_yaml_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(notmap)


def test_apply_overrides_refuses_to_descend_into_scalars():
    with pytest.raises(ConfigError):
        apply_overrides({"mode": "sync"}, ["mode.x=1"])
