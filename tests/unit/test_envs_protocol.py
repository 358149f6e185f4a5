"""Agent protocol, registry, base-class rules and GuardedEnv, without any third-party game."""

from __future__ import annotations

import threading
import time

import pytest

from services.config import EnvConfig
from services.envs import (
    WIN_REWARD,
    EnvInfraError,
    GuardedEnv,
    Task,
    TaskError,
    TextEnv,
    list_envs,
    make_env,
    register_env,
)
from services.envs.protocol import build_messages, format_response, parse_action

# --------------------------------------------------------------------------- parse_action


@pytest.mark.parametrize("text, action, valid, reason", [
    ("<think>go</think><action>Take Apple</action>", "take apple", True, ""),
    ("<action> open   the\n door </action> <action>second</action>", "open the door", True, ""),
    ("<ACTION>look</ACTION>", "look", True, ""),
    ("I will take the apple", "", False, "missing_tag"),
    ("<action>take apple", "", False, "missing_tag"),
    ("<think>我想</think><action>look</action>", "", False, "cjk"),
    ("<action>りんご</action>", "", False, "cjk"),
    ("<action>   </action>", "", False, "empty"),
    ("<action>" + "a" * 21 + "</action>", "", False, "too_long"),
    ("<action>" + "a" * 20 + "</action>", "a" * 20, True, ""),
])
def test_parse_action_rules(text, action, valid, reason):
    p = parse_action(text, max_chars=20)
    assert (p.action, p.valid, p.reason) == (action, valid, reason)


def test_format_response_round_trips_through_the_parser():
    resp = format_response("put teapot in coffee table", think="it belongs there")
    assert resp == "<think>it belongs there</think><action>put teapot in coffee table</action>"
    assert parse_action(resp, 200).action == "put teapot in coffee table"


# --------------------------------------------------------------------------- build_messages


def _history(n):
    return [(f"obs{i} " + "x" * 300, f"act{i}") for i in range(n)]


def test_generic_prompt_has_every_paper_element():
    cfg = EnvConfig(name="alfworld", history=2, obs_chars=50)
    msgs = build_messages("put a mug in sink", _history(5), "You see a mug.", ["take mug", "look"], 5, cfg)
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    assert "put a mug in sink" in user and "5 step(s)" in user and "step 6" in user
    assert "obs3" in user and "obs4" in user and "obs2" not in user  # only the last k=2 pairs
    assert "act3" in user and "act4" in user
    assert "x" * 51 not in user  # history observations cut to obs_chars
    assert "You see a mug." in user and "'take mug', 'look'" in user
    assert "<think>" in user and "<action>" in user and "ALFRED" in user


def test_first_turn_and_zero_history():
    cfg = EnvConfig(name="scienceworld", history=0)
    user = build_messages("boil water", _history(3), "kitchen", ["look around"], 3, cfg)[1]["content"]
    assert not any(f"obs{i}" in user for i in range(3)) and "ScienceWorld" in user


def test_twc_template_is_compact():
    cfg = EnvConfig()  # the quick-start default: textworldexpress / twc
    obs = "You are in the kitchen. " * 4
    msgs = build_messages("Your task is to put things away.", _history(4), obs, ["take cup", "look around"], 4, cfg)
    user = msgs[1]["content"]
    assert "Step 5." in user and "Actions: take cup | look around" in user
    assert user.count("Saw:") == 2 and all(len(line) <= 5 + 120 for line in user.splitlines()
                                           if line.startswith("Saw:"))
    assert len(msgs[0]["content"]) + len(user) < 700  # ~175 tokens for the tiny model


# --------------------------------------------------------------------------- registry


def test_registry_lists_and_rejects():
    assert {"textworldexpress", "textworld", "scienceworld", "alfworld", "webshop"} <= set(list_envs())
    with pytest.raises(TaskError, match="known: .*textworldexpress"):
        make_env(EnvConfig(name="nope"))
    with pytest.raises(ValueError, match="already registered"):
        register_env("webshop", "services.envs.webshop:WebShopEnv")
    with pytest.raises(TaskError, match="no attribute"):
        make_env(EnvConfig(name="services.envs.webshop:Missing"))


def test_module_attr_names_an_env():
    env = make_env(EnvConfig(name="services.envs.webshop:WebShopEnv"))
    assert env.name == "webshop"


# --------------------------------------------------------------------------- base-class rules (catalogue shop)


def test_reward_convention_truncation_and_order_errors():
    env = make_env(EnvConfig(name="webshop", max_steps=3))
    task = env.sample_tasks("train", 1, 0)[0]
    with pytest.raises(TaskError):
        env.step("look")
    with pytest.raises(TaskError, match="belongs to env"):
        env.reset(Task("alfworld", "x", 0, "train"))
    env.reset(task)
    results = [env.step("click[nothing]") for _ in range(3)]
    assert [r.done for r in results] == [False, False, True]
    assert results[-1].info["truncated"] and not results[-1].info["won"]
    assert all(r.reward == 0.0 for r in results) and results[0].info["admissible"] is False
    with pytest.raises(TaskError, match="after the episode ended"):
        env.step("search[x]")
    env = make_env(EnvConfig(name="webshop", max_steps=10))
    env.reset(task)
    for a in env.expert_actions():
        r = env.step(a)
    assert r.done and r.info["won"] and r.reward == 10.0 and r.info["score"] == 1.0


def test_nearest_action_picks_the_most_similar_listed_action():
    from services.envs.base import nearest_action

    actions = ["take striped bed sheet", "take gray bed sheet", "open wardrobe", "look around"]
    assert nearest_action("take striped duvet", actions) == "take striped bed sheet"
    assert nearest_action("open the wardrobe", actions) == "open wardrobe"
    assert nearest_action("take striped duvet", actions, min_ratio=0.95) is None
    assert nearest_action("anything", []) is None
    assert nearest_action("ab", ["ax", "bx"]) == "ax"  # equal ratios: the earlier listed wins


class _Listed(TextEnv):
    """A TextEnv with a fixed action list whose observation says what it played."""

    name = "listed"

    def sample_tasks(self, split, n, seed):
        return [Task("listed", f"t{i}", i, split) for i in range(n)]

    def _reset(self, task):
        return "start", {"admissible_actions": ["Take striped bed sheet", "look around"], "task_description": ""}

    def _step(self, action):
        return f"played {action}", {"admissible_actions": ["Take striped bed sheet", "look around"]}


def test_projection_plays_the_nearest_admissible_action_and_says_so():
    seen = {}
    for mode in ("none", "nearest"):
        env = _Listed(EnvConfig(action_projection=mode))
        env.reset(env.sample_tasks("train", 1, 0)[0])
        r = env.step("take striped duvet")
        assert r.info["admissible"] is False  # the model's text was not admissible either way
        seen[mode] = r.observation, r.info.get("projected_from"), r.info.get("action")
        assert env.step("look around").info["admissible"] is True  # listed: never projected
    assert seen["none"] == ("played take striped duvet", None, None)
    # The env's own spelling is played; info keeps the model's text and the lowercased action.
    assert seen["nearest"] == ("played Take striped bed sheet", "take striped duvet", "take striped bed sheet")


def test_index_format_numbers_the_list_and_answers_with_a_number():
    from services.envs.protocol import answer_for, resolve_choice

    acts = ["take cup", "Look around", "open fridge"]
    twc = EnvConfig(action_format="index")
    user = build_messages("put things away", [], "kitchen", acts, 0, twc)[1]["content"]
    assert "Actions: 1 take cup | 2 Look around | 3 open fridge" in user
    generic = build_messages("t", [], "o", acts, 0, EnvConfig(name="alfworld", action_format="index"))[1]["content"]
    assert "1 take cup; 2 Look around; 3 open fridge" in generic and "number" in generic
    assert answer_for("look around", acts, twc) == "2"  # case-insensitive match to the listed spelling
    assert answer_for("eat cup", acts, twc) == "eat cup"  # not listed: the text itself
    assert answer_for("look around", acts, EnvConfig()) == "look around"  # text format
    assert resolve_choice(" 3 ", acts) == "open fridge"
    for bad in ("0", "4", "-1", "2.0", "two", "", "\u0663"):  # out of range, not a plain ASCII number
        assert resolve_choice(bad, acts) is None


def test_index_answers_play_the_listed_action_and_other_answers_are_text():
    env = _Listed(EnvConfig(action_format="index", action_projection="nearest"))
    env.reset(env.sample_tasks("train", 1, 0)[0])
    r = env.step("1")
    assert r.observation == "played Take striped bed sheet"  # the env's own spelling
    assert (r.info["admissible"], r.info["choice"], r.info["action"]) == (True, 1, "take striped bed sheet")
    r = env.step("3")  # not a listed number: read as text, then projected like any inadmissible text
    assert r.info["admissible"] is False and "choice" not in r.info and r.info["projected_from"] == "3"
    r = env.step("look around")  # a listed action written out still plays
    assert r.info["admissible"] is True and r.observation == "played look around"
    plain = _Listed(EnvConfig())  # text format: a number is just text
    plain.reset(plain.sample_tasks("train", 1, 0)[0])
    assert plain.step("1").info["admissible"] is False



class _Scored(TextEnv):
    """A game whose normalised score follows a script: 0.5, 0.5, 0.25 (a mistake undoes), 1.0 (won)."""

    name = "scored"
    SCORES = [0.5, 0.5, 0.25, 1.0]

    def sample_tasks(self, split, n, seed):
        return [Task("scored", f"t{i}", i, split) for i in range(n)]

    def _reset(self, task):
        self._i = 0
        return "start", {"admissible_actions": ["go"], "task_description": "", "score": 0.0}

    def _step(self, action):
        score = self.SCORES[self._i]
        self._i += 1
        return "moved", {"admissible_actions": ["go"], "score": score, "won": score == 1.0}


@pytest.mark.parametrize("mode, rewards", [("success", [0.0, 0.0, 0.0, WIN_REWARD]),
                                           ("score", [5.0, 0.0, -2.5, 7.5])])
def test_reward_is_the_win_or_the_change_of_score(mode, rewards):
    env = _Scored(EnvConfig(reward=mode))
    for _ in range(2):  # a second episode starts from the reset's score, not the last one's
        env.reset(env.sample_tasks("train", 1, 0)[0])
        got = [env.step("go") for _ in range(4)]
        assert [r.reward for r in got] == pytest.approx(rewards)
        assert [r.info["won"] for r in got] == [False, False, False, True]  # success is the game's flag
        assert sum(r.reward for r in got) == pytest.approx(WIN_REWARD)  # a won game earns WIN_REWARD in all

# --------------------------------------------------------------------------- GuardedEnv


class _Flaky(TextEnv):
    """A TextEnv whose step misbehaves on demand (the wrapper under test sees a real TextEnv)."""

    name = "flaky"
    created = 0

    def __init__(self, cfg):
        super().__init__(cfg)
        type(self).created += 1
        self.mode = "ok"
        self.closed = threading.Event()

    def sample_tasks(self, split, n, seed):
        if split != "train":
            raise TaskError("train only")
        return [Task("flaky", f"t{i}", i, split) for i in range(n)]

    def _reset(self, task):
        return "start", {"admissible_actions": ["win", "wait"], "task_description": "win"}

    def _step(self, action):
        if self.mode == "raise":
            raise RuntimeError("simulator crashed")
        if self.mode == "hang":
            self.closed.wait(10)
        return "ok", {"admissible_actions": ["win"], "won": action == "win", "score": 1.0}

    def close(self):
        self.closed.set()


@pytest.mark.parametrize("isolate", [False, True])
def test_guarded_env_turns_failures_into_infra_errors_and_recreates(isolate):
    _Flaky.created = 0
    g = GuardedEnv(lambda: _Flaky(EnvConfig(name="flaky")), step_timeout_s=0.5, isolate=isolate)
    task = g.sample_tasks("train", 1, 0)[0]
    with pytest.raises(TaskError):  # caller errors pass through unchanged
        g.sample_tasks("test", 1, 0)
    g.reset(task)
    assert g.step("win").reward == 10.0

    g.reset(task)
    g.env.mode = "raise"
    with pytest.raises(EnvInfraError, match="simulator crashed"):
        g.step("wait")
    with pytest.raises(EnvInfraError, match="call reset"):
        g.step("wait")
    g.reset(task)  # a fresh env
    assert _Flaky.created == 2 and g.restarts == 1

    g.env.mode = "hang"
    broken = g.env
    t = time.perf_counter()
    with pytest.raises(EnvInfraError, match="timed out"):
        g.step("wait")
    assert time.perf_counter() - t < 3.0
    assert broken.closed.wait(2.0)  # the hung instance was closed
    g.reset(task)
    assert g.step("win").info["won"] and g.infra_failures == 2 and _Flaky.created == 3
    g.close()


# --------------------------------------------------------------------------- ALFWorld generator (no engine)


def test_alfworld_problem_generation_is_deterministic_and_split_aware():
    gen = pytest.importorskip("services.envs.alfworld_gen")
    pytest.importorskip("alfworld")
    a = gen.build_problem(1, "heat", 7)
    assert a == gen.build_problem(1, "heat", 7)
    assert a[0] != gen.build_problem(1, "heat", 8)[0]
    problem, traj, desc = a
    assert traj["task_type"] == "pick_heat_then_place_in_recep" and traj["pddl_params"]["object_target"]
    assert "(heatable " in problem and "MicrowaveType" in problem and desc in traj["turk_annotations"]["anns"][0].values()
    assert set(gen.split_scenes("valid_unseen")) == set(gen.UNSEEN_SCENES)
    assert not set(gen.split_scenes("train")) & set(gen.UNSEEN_SCENES)
    with pytest.raises(gen.GenerationError, match="do not occur"):
        gen.build_problem(301, "heat", 0)  # a bedroom has no microwave task
    with pytest.raises(gen.GenerationError, match="unknown task type"):
        gen.build_problem(1, "slice", 0)


@pytest.mark.parametrize("name", ["textworldexpress", "alfworld"])
def test_now_chars_cuts_the_current_observation_only_when_set(name):
    obs = "You are in the kitchen.   " + "y" * 300
    whole = build_messages("t", [], obs, ["look around"], 0, EnvConfig(name=name))[1]["content"]
    cut = build_messages("t", [], obs, ["look around"], 0, EnvConfig(name=name, now_chars=40))[1]["content"]
    assert "y" * 300 in whole
    assert "You are in the kitchen. " + "y" * 16 in cut and "y" * 17 not in cut  # whitespace collapsed, then 40 chars
    assert "look around" in cut  # the admissible actions are never cut
