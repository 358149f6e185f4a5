"""Expert demonstrations in the agent protocol, and the `proxmo envs check` / `demos` commands."""

from __future__ import annotations

import json

from services.config import EnvConfig
from services.envs import make_env
from services.envs.check import main as check_main
from services.envs.experts import expert_episodes, expert_examples
from services.envs.experts import main as demos_main
from services.envs.protocol import parse_action


def test_twc_expert_examples_follow_the_protocol():
    cfg = EnvConfig()  # quick-start default: twc, 1 location, 2 items, max_steps 10
    env = make_env(cfg)
    examples, stats = expert_episodes(cfg, n_episodes=4, seed=0, env=env)
    assert stats == {"episodes": 4, "won": 4, "dropped": 0}
    assert examples == expert_episodes(cfg, 4, 0, env=env)[0]  # deterministic
    by_episode: dict[str, list[dict]] = {}
    for ex in examples:
        by_episode.setdefault(ex["task_id"], []).append(ex)
        assert ex["task_type"] == "twc"
        assert [m["role"] for m in ex["messages"]] == ["system", "user"]
        parsed = parse_action(ex["response"], cfg.max_action_chars)
        assert parsed.valid and parsed.action == parsed.action.lower()
        # The demonstrated action is one of the admissible actions shown in that prompt.
        actions_line = ex["messages"][1]["content"].rsplit("Actions: ", 1)[1]
        assert parsed.action in actions_line.split(" | ")
    assert len(by_episode) == 4
    for steps in by_episode.values():
        assert [e["step"] for e in steps] == list(range(len(steps)))
        assert f"Step {len(steps)}." in steps[-1]["messages"][1]["content"]

    # Replaying the demonstrated actions wins every episode (nothing was dropped or invented).
    try:
        for task in env.sample_tasks("train", 4, 0):
            env.reset(task)
            for ex in by_episode[task.task_id]:
                r = env.step(parse_action(ex["response"], 200).action)
            assert r.info["won"]
    finally:
        env.close()


def test_demo_noise_relabels_a_share_of_steps_with_other_admissible_actions():
    cfg = EnvConfig()
    env = make_env(cfg)
    try:
        clean, _ = expert_episodes(cfg, n_episodes=12, seed=3, env=env)
        noisy, stats = expert_episodes(cfg, n_episodes=12, seed=3, env=env, noise=0.5)
        assert noisy == expert_episodes(cfg, 12, 3, env=env, noise=0.5)[0]  # seeded
    finally:
        env.close()
    assert stats["won"] == 12 and len(noisy) == len(clean)  # the env still follows the expert
    changed = 0
    for c, n in zip(clean, noisy):
        assert c["messages"] == n["messages"]  # same states: only labels differ
        if c["response"] != n["response"]:
            changed += 1
            action = parse_action(n["response"], cfg.max_action_chars).action
            assert action in n["messages"][1]["content"].rsplit("Actions: ", 1)[1].split(" | ")
    assert 0.3 * len(clean) < changed < 0.7 * len(clean)


def test_expert_examples_webshop():
    rows = expert_examples(EnvConfig(name="webshop", max_steps=15), 3, 0, split="dev")
    assert {r["step"] for r in rows} >= {0, 1, 2, 3} and all("WebShop" in r["messages"][1]["content"] for r in rows)


def test_demos_cli_writes_jsonl(tmp_path):
    out = tmp_path / "demos.jsonl"
    assert demos_main(["--out", str(out), "--episodes", "2", "name=webshop", "max_steps=15"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["response"].startswith("<think>") for r in rows)
    assert rows[0]["response"].endswith("</action>") and "search[" in rows[0]["response"]
    assert demos_main(["--out", str(out), "bogus=1"]) == 2
    assert demos_main(["--out", str(out), "--noise", "1.5"]) == 2


def test_envs_check_reports_and_counts(capsys):
    assert check_main(["--envs", "webshop,textworldexpress", "--quick", "--episodes", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "2 passed, 0 failed"
    assert any("webshop" in ln and "2/2 (100.0%)" in ln and "steps/s" in ln for ln in lines)


def test_the_warm_start_builds_the_configured_tiny_model_shape(tmp_path):
    from transformers import AutoConfig

    from services.config import ModelConfig, SFTConfig
    from services.sft import ensure_warm_model

    model = ModelConfig(path=str(tmp_path / "m"), tiny_hidden=48, tiny_layers=1, tiny_heads=3, tiny_intermediate=96)
    path = ensure_warm_model(model, EnvConfig(), SFTConfig(episodes=3, epochs=0.1, seconds=30), seed=0)
    c = AutoConfig.from_pretrained(path)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (48, 1, 3, 96)
