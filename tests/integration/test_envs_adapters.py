"""Every adapter against the real third-party environment (offline), one short game each.

Longer sweeps (all TextWorld challenges, all ALFWorld task types, more
ScienceWorld tasks) are marked slow; JVM-kill fault injection is marked faults.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from services.config import EnvConfig
from services.envs import EnvInfraError, GuardedEnv, TaskError, make_env
from services.envs.check import env_config

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def play_expert(env, task):
    obs, info = env.reset(task)
    plan = env.expert_actions()
    assert plan, f"no expert plan for {task}"
    trace = [obs]
    for action in plan:
        r = env.step(action.lower())
        trace.append(r.observation)
        if r.done:
            break
    return info, r, trace


def assert_deterministic(env, task, actions):
    """Same task, same actions -> byte-identical observations (the anchor states)."""
    def run():
        obs, _ = env.reset(task)
        out = [obs]
        for a in actions:
            r = env.step(a)
            out.append(r.observation)
            if r.done:
                break
        return out
    assert run() == run()


def assert_tolerates_garbage(env, task):
    """Invalid model output reaches the env as "" or junk: the env answers, it does not fail or end."""
    env.reset(task)
    for junk in ("", "blorp the zork", "x" * 300):
        r = env.step(junk)
        assert not r.done and r.reward == 0.0 and r.info["admissible"] is not True


def assert_won(r):
    assert r.done and r.info["won"] and r.reward == 10.0, r.info


# --------------------------------------------------------------------------- TextWorldExpress


@pytest.fixture(scope="module")
def twc_env():
    env = make_env(EnvConfig(max_steps=50))
    yield env
    env.close()


def test_twx_twc_expert_determinism_and_folds(twc_env):
    tasks = twc_env.sample_tasks("train", 3, seed=1)
    assert tasks == twc_env.sample_tasks("train", 3, seed=1)
    assert {t.task_id for t in twc_env.sample_tasks("test", 20, 0)}.isdisjoint(
        {t.task_id for t in twc_env.sample_tasks("train", 20, 0)})
    for task in tasks:
        info, r, _ = play_expert(twc_env, task)
        assert_won(r)
        assert info["task_type"] == "twc" and info["admissible_actions"] and info["task_description"]
        assert 0.99 <= r.info["score"] <= 1.0
    assert_deterministic(twc_env, tasks[0], ["look around", "inventory", "look around"])
    assert_tolerates_garbage(twc_env, tasks[0])
    with pytest.raises(TaskError, match="unknown split"):
        twc_env.sample_tasks("nope", 1, 0)


def test_twx_heldout_split_is_disjoint_from_train(twc_env):
    train, held = set(twc_env.split_seeds("train")), set(twc_env.split_seeds("heldout"))
    fold = set(twc_env.split_seeds("dev")) | set(twc_env.split_seeds("test"))
    assert train and held and train.isdisjoint(held) and fold.isdisjoint(train | held)
    assert len(held) * 4 == len(train)  # one seed in five
    tasks = twc_env.sample_tasks("heldout", 30, seed=2)
    assert {t.seed for t in tasks} <= held and {t.seed for t in twc_env.sample_tasks("train", 300, 2)} <= train
    _, r, _ = play_expert(twc_env, tasks[0])  # the train fold's simulator plays a heldout task
    assert_won(r)


def test_twx_every_game_family(twc_env):
    from services.envs.twx import GAMES, TextWorldExpressEnv

    for game in GAMES:  # one JVM, switching games
        env = TextWorldExpressEnv(env_config("textworldexpress", game, max_steps=100), simulator=twc_env.simulator)
        for split in ("dev", "test"):
            task = env.sample_tasks(split, 1, seed=3)[0]
            assert task.task_type == game
            _, r, _ = play_expert(env, task)
            assert_won(r)


def test_twx_lowercased_actions_reach_mixed_case_commands(twc_env):
    # Find a game whose commands have capitals ("T-shirt"); the parser lowercases, the env must still act.
    for task in twc_env.sample_tasks("train", 40, seed=0):
        obs, info = twc_env.reset(task)
        mixed = [a for a in twc_env.expert_actions() if a != a.lower()]
        if mixed:
            break
    else:
        pytest.skip("no mixed-case command in 40 games")
    for a in twc_env.expert_actions():
        r = twc_env.step(a.lower())
        assert r.info["admissible"] is True
    assert_won(r)


@pytest.mark.faults
def test_twx_jvm_death_is_an_infra_error_and_heals():
    g = GuardedEnv(lambda: make_env(EnvConfig(max_steps=20)), step_timeout_s=10)
    task = g.sample_tasks("train", 1, 0)[0]
    obs, _ = g.reset(task)
    g.env.java_process.kill()
    with pytest.raises(EnvInfraError):
        g.step("look around")
    obs2, _ = g.reset(task)
    assert obs2 == obs and g.restarts == 1
    g.close()


# --------------------------------------------------------------------------- TextWorld (tw-make)


@pytest.fixture(scope="module")
def tw_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("twgames"))


def test_textworld_generated_game(tw_cache):
    cfg = EnvConfig(name="textworld", game="coin_collector", game_params="level=1", max_steps=50,
                    options={"cache_dir": tw_cache})
    with make_env(cfg) as env:
        task = env.sample_tasks("train", 1, 0)[0]
        info, r, _ = play_expert(env, task)
        assert_won(r)
        assert r.info["score"] == 1.0 and info["task_description"]
        assert_deterministic(env, task, ["look", "inventory"])
        assert_tolerates_garbage(env, task)
    assert len([f for f in os.listdir(tw_cache) if f.endswith(".z8")]) == 1  # cached, generated once


@pytest.mark.slow
@pytest.mark.parametrize("game", ["simple", "treasure_hunter", "cooking"])
def test_textworld_other_challenges(game, tw_cache):
    cfg = EnvConfig(name="textworld", game=game, max_steps=100, options={"cache_dir": tw_cache})
    with make_env(cfg) as env:
        for split in ("train", "test"):
            _, r, _ = play_expert(env, env.sample_tasks(split, 1, 0)[0])
            assert_won(r)


def test_textworld_bad_settings():
    with pytest.raises(TaskError, match="unknown coin_collector setting"):
        make_env(EnvConfig(name="textworld", game="coin_collector", game_params="colour=red"))


# --------------------------------------------------------------------------- ALFWorld


@pytest.fixture(scope="module")
def alf_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("alfworld")


def alf_env(cache, game="all", **opts):
    return make_env(EnvConfig(name="alfworld", game=game, max_steps=50,
                              options={"source": "generated", "cache_dir": str(cache), **opts}))


@pytest.mark.parametrize("task_type", ["pick", pytest.param("look", marks=pytest.mark.slow)])
def test_alfworld_generated_games_run_in_the_real_engine(task_type, alf_cache):
    with alf_env(alf_cache, task_type) as env:
        task = env.sample_tasks("train", 1, 0)[0]
        assert task.task_type == task_type
        info, r, trace = play_expert(env, task)
        assert_won(r)
        assert trace[0].startswith("-= Welcome to TextWorld, ALFRED! =-")
        assert info["task_description"] and "go to" in " ".join(info["admissible_actions"])
        assert_deterministic(env, task, env.expert_actions()[:2])
        assert_tolerates_garbage(env, task)


@pytest.mark.slow
@pytest.mark.parametrize("task_type", ["clean", "heat", "cool", "pick2"])
@pytest.mark.parametrize("expert", ["planner", "handcoded"])
def test_alfworld_all_task_types_both_experts(task_type, expert, alf_cache):
    with alf_env(alf_cache, task_type, expert=expert) as env:
        env.cfg.max_steps = 150
        for split in ("train", "valid_unseen"):
            _, r, _ = play_expert(env, env.sample_tasks(split, 1, 0)[0])
            assert_won(r)


def test_alfworld_benchmark_layout_is_read_like_alfworld(tmp_path, alf_cache):
    """Lay generated games out as json_2.1.1/<split>/<task>/<trial>/ and load them as the benchmark."""
    with alf_env(alf_cache, "pick") as gen_env:  # the pick game of the test above (cached)
        src = gen_env.game_path(gen_env.sample_tasks("train", 1, 0)[0])
    root = tmp_path / "alfworld_data"
    for name in ("pick_and_place_simple-Mug-None-Desk-1/trial_1", "pick_and_place_simple-Mug-None-Desk-1/trial_2",
                 "pick_and_place_simple-movable-x/trial_3"):
        d = root / "json_2.1.1" / "valid_seen" / name
        shutil.copytree(src.parent, d)
    unsolvable = root / "json_2.1.1" / "valid_seen" / "pick_and_place_simple-Mug-None-Desk-1" / "trial_2"
    game = json.loads((unsolvable / "game.tw-pddl").read_text())
    (unsolvable / "game.tw-pddl").write_text(json.dumps({**game, "solvable": False}))
    env = make_env(EnvConfig(name="alfworld", data_path=str(root), max_steps=30))
    try:
        assert env.source == "benchmark"
        tasks = env.sample_tasks("valid_seen", 3, 0)
        assert {t.task_id for t in tasks} == {"json_2.1.1/valid_seen/pick_and_place_simple-Mug-None-Desk-1/trial_1"}
        _, r, _ = play_expert(env, tasks[0])
        assert_won(r)
        with pytest.raises(TaskError, match="does not exist"):
            env.sample_tasks("train", 1, 0)
    finally:
        env.close()


# --------------------------------------------------------------------------- ScienceWorld


@pytest.fixture(scope="module")
def sw_env():
    env = make_env(EnvConfig(name="scienceworld", game="find-living-thing", max_steps=60))
    yield env
    env.close()


def test_scienceworld_short_task_expert_and_cache(sw_env):
    task = sw_env.sample_tasks("train", 1, 0)[0]
    _, r, trace = play_expert(sw_env, task)
    assert_won(r)
    hits = sw_env.cache_hits
    plan = [a.lower() for a in sw_env.expert_actions()]
    assert_deterministic(sw_env, task, plan[:3])
    assert_tolerates_garbage(sw_env, task)
    assert sw_env.cache_hits > hits  # replayed prefixes reuse the valid-action lists


@pytest.mark.slow
@pytest.mark.parametrize("game", ["boil", "melt", "identify-life-stages-1", "chemistry-mix"])
def test_scienceworld_more_tasks(game):
    with make_env(EnvConfig(name="scienceworld", game=game, max_steps=200,
                            options={"valid_actions": False})) as env:
        for split in ("dev", "test"):
            _, r, _ = play_expert(env, env.sample_tasks(split, 1, 0)[0])
            assert_won(r)


# --------------------------------------------------------------------------- WebShop (own catalogue)


def test_webshop_catalog_score_success_split():
    with make_env(EnvConfig(name="webshop", max_steps=15)) as env:
        tasks = env.sample_tasks("train", 5, 0)
        for t in tasks:
            _, r, _ = play_expert(env, t)
            assert_won(r)
            assert r.info["score"] == 1.0
        # Buy the target without choosing its options: partial score, not a success.
        task = tasks[0]
        env.reset(task)
        plan = env.expert_actions()
        for a in plan[:2] + ["click[buy now]"]:
            r = env.step(a)
        assert r.done and 0 < r.info["score"] < 1 and not r.info["won"] and r.info["lost"] and r.reward == 0.0
        assert_deterministic(env, task, plan)
        assert_tolerates_garbage(env, task)
    with pytest.raises(TaskError, match="not a WebShop checkout"):
        make_env(EnvConfig(name="webshop", data_path="/nonexistent"))


def _wait_until_stopped(pid: int, timeout_s: float = 10.0) -> None:
    """SIGSTOP is delivered asynchronously: until every thread of the JVM is stopped, a request can
    still be answered (seen: a step returned in 1 ms right after the signal on a busy 2-core host)."""
    import os
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # the thread ended meanwhile
                continue
        if states and all(s in "tT" for s in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"JVM {pid} not stopped after {timeout_s} s: thread states {sorted(set(states))}")
        time.sleep(0.01)


@pytest.mark.faults
@pytest.mark.parametrize("isolate", [False, True])
def test_twx_frozen_jvm_times_out_and_heals(isolate):
    import signal
    import time

    g = GuardedEnv(lambda: make_env(EnvConfig(max_steps=20)), step_timeout_s=2, isolate=isolate)
    task = g.sample_tasks("train", 1, 0)[0]
    obs, _ = g.reset(task)
    proc = g.env.java_process
    proc.send_signal(signal.SIGSTOP)  # the JVM stops answering: the step call hangs
    _wait_until_stopped(proc.pid)
    try:
        t = time.perf_counter()
        with pytest.raises(EnvInfraError, match="timed out"):
            g.step("look around")
        # The guard answers after its 2 s timeout instead of hanging; the margin covers a loaded host
        # (the isolated variant also has a process to wind down).
        assert time.perf_counter() - t < 30
    finally:
        proc.kill()
    assert g.reset(task)[0] == obs and g.restarts == 1
    g.close()


@pytest.mark.faults
def test_isolated_guard_frees_a_caller_held_up_by_the_frozen_jvm(monkeypatch):
    """The caller of an isolated guard can itself block on a frozen JVM: the garbage collector runs
    py4j's finalizers (a "release object" command to the JVM) in whatever thread allocates, so the
    caller's thread can be stuck on the JVM's socket before it ever waits for its deadline. The
    watchdog must kill the JVM at the deadline. Here the caller's wait first makes such a call."""
    import concurrent.futures as cf
    import signal
    import threading
    import time

    g = GuardedEnv(lambda: make_env(EnvConfig(max_steps=20)), step_timeout_s=2, isolate=True)
    task = g.sample_tasks("train", 1, 0)[0]
    obs, _ = g.reset(task)
    proc = g.env.java_process
    jvm = g.env.simulator._gateway.jvm
    original = cf.Future.result

    def held_up_result(fut, timeout=None):
        if threading.current_thread() is caller:
            try:
                jvm.java.lang.System.currentTimeMillis()  # blocks until the JVM dies
            except Exception:  # noqa: BLE001 - the killed JVM's socket fails the call
                pass
        return original(fut, timeout)

    outcome: dict[str, object] = {}

    def call() -> None:
        t = time.perf_counter()
        try:
            g.step("look around")
        except EnvInfraError as exc:
            outcome["error"] = str(exc)
        outcome["seconds"] = time.perf_counter() - t

    caller = threading.Thread(target=call, daemon=True)
    proc.send_signal(signal.SIGSTOP)
    _wait_until_stopped(proc.pid)
    monkeypatch.setattr(cf.Future, "result", held_up_result)
    try:
        caller.start()
        caller.join(60)
    finally:
        monkeypatch.undo()
        proc.kill()
    assert not caller.is_alive(), "the guarded call never returned: nothing killed the frozen JVM"
    assert "timed out" in str(outcome.get("error")) and outcome["seconds"] < 30
    assert proc.wait(5) is not None
    assert g.reset(task)[0] == obs and g.restarts == 1
    g.close()
