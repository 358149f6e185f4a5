"""The benchmark suite's collection code: parsing, targets, tables, aggregation. No benchmark runs here."""

from __future__ import annotations

import math
import sys

import pytest

from services.bench import curves, e2e, scaling, suite

OUTPUT = """\
[base] 16 groups x 8 episodes: 4522 rows
tfidf_fit      182.0   45.6
growth 8x batch (8.47x rows): tfidf_fit 8.71x
scenario=twx_guarded_vs_raw raw_steps_per_s=812.3 guarded_steps_per_s=790.1 ratio=0.973
publish_staged_vs_copy=3.25
not a ratio = 3
publish_vs_copy=1.842
"""


def test_kv_lines_and_headline():
    kv = suite.parse_kv_lines(OUTPUT)
    assert kv == {"publish_staged_vs_copy": 3.25, "publish_vs_copy": 1.842}  # multi-pair rows are not ratios
    assert suite.last_kv(OUTPUT) == ("publish_vs_copy", 1.842)
    assert suite.last_kv("no numbers here\n") is None
    assert math.isnan(suite.parse_kv_lines("x=nan\n")["x"])
    assert suite.parse_kv_lines("a=1e-3\nb=-2.5\nc=.5\n") == {"a": 1e-3, "b": -2.5, "c": 0.5}


def test_envs_metrics_come_from_its_json():
    rows = [{"scenario": "twx_guarded_vs_raw", "raw_steps_per_s": 800.0, "guarded_steps_per_s": 780.0, "watchdog_ratio": 0.8,
             "ratio": 0.975},
            {"scenario": "scienceworld_cached_vs_uncached", "ratio": 6.1, "no_valid_vs_uncached": 3.2},
            {"scenario": "webshop_steps_per_s", "steps": 90, "steps_per_s": 410.5}]
    m = suite.metrics_from_json("envs", rows)
    assert m == {"twx_guarded_vs_raw": 0.975, "twx_guarded_vs_raw.watchdog_ratio": 0.8,
                 "scienceworld_cached_vs_uncached": 6.1,
                 "scienceworld_cached_vs_uncached.no_valid_vs_uncached": 3.2, "webshop_steps_per_s": 410.5}
    assert suite.metrics_from_json("weights", {"sizes": []}) == {}


@pytest.mark.parametrize("value,target,expected", [
    (1.7, (">=", 1.6), True), (1.2, (">=", 1.6), False), (2.0, ("<=", 2.0), True), (2.01, ("<=", 2.0), False),
    (1.0, None, None), (float("nan"), (">=", 1.0), None)])
def test_targets(value, target, expected):
    assert suite.meets(value, target) is expected


def _result(name, value, rc=0, met=None, metrics=None, target=None):
    return {"name": name, "headline": f"{name}_ratio", "value": value, "rc": rc, "ok": rc == 0 and not math.isnan(value),
            "target": target, "meets_target": met, "metrics": {f"{name}_ratio": value, **(metrics or {})}, "seconds": 3.0}


def test_table_and_summary_show_failures_and_missed_targets():
    results = [_result("a", 1.8, met=True, target=[">=", 1.6]), _result("b", 0.5, met=False, target=["<=", 0.4],
                                                                          metrics={"extra": 2.0}),
               _result("c", float("nan"), rc=1)]
    table = suite.markdown_table(results)
    rows = table.splitlines()
    assert len(rows) == 2 + 3
    assert "| a | `a_ratio` | 1.800 | >= 1.6 | yes |" in rows[2]
    assert "**no**" in rows[3] and "extra=2.000" in rows[3]
    assert "failed (rc 1)" in rows[4] and "n/a" in rows[4]
    line = suite.summary_line(results)
    assert line.startswith("bench all: 2/3 ok, 1/2 targets met;")
    assert "a_ratio=1.800" in line and "c_ratio=n/a" in line


def test_selection_and_commands(tmp_path):
    default = [b.name for b in suite.select("", "", False)]
    assert default == ["advantages", "buffer", "serving", "weights", "envs", "e2e", "scaling"]
    assert "curves" in [b.name for b in suite.select("", "", True)]
    assert [b.name for b in suite.select("e2e,envs", "envs", False)] == ["e2e"]
    with pytest.raises(ValueError, match="unknown benchmark"):
        suite.select("nope", "", False)
    cmd = suite.command(suite.BY_NAME["e2e"], tmp_path / "e2e.json", quick=True, python="py")
    assert cmd[:6] == ["py", "-m", "services.cli", "bench", "e2e", "--json"]
    assert "learner.groups_per_batch=2" in cmd  # dotted overrides after the options


def test_every_suite_entry_is_a_registered_cli_command():
    from services.cli import COMMANDS

    assert set(suite.BY_NAME) <= set(COMMANDS["bench"]) and COMMANDS["bench"]["all"] == "services.bench.suite:main"


def test_run_one_collects_a_real_subprocess(tmp_path, monkeypatch):
    # A stand-in benchmark module run through the same subprocess path (python -c instead of the CLI).
    script = "import json,sys; p=sys.argv[sys.argv.index('--json')+1]; json.dump({'k':1}, open(p,'w'));" \
             "print('noise'); print('other_ratio=2.5'); print('fake_ratio=1.25')"
    monkeypatch.setattr(suite, "command", lambda b, j, q, python=sys.executable: [python, "-c", script, "--json", str(j)])
    bench = suite.Bench("fake", (), (), "fake_ratio", ("<=", 1.5), "a fake")
    r = suite.run_one(bench, tmp_path, quick=False, timeout_s=60)
    assert r["rc"] == 0 and r["ok"] and r["value"] == 1.25 and r["meets_target"] is True
    assert r["metrics"] == {"other_ratio": 2.5, "fake_ratio": 1.25} and r["json"] == {"k": 1}


def test_run_one_kills_a_silent_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "command", lambda b, j, q, python=sys.executable: [python, "-c", "import time; time.sleep(30)"])
    r = suite.run_one(suite.Bench("hang", (), (), "x", None, "hangs"), tmp_path, quick=False, timeout_s=1)
    assert r["rc"] == -9 and not r["ok"] and "killed after" in r["tail"]


# ----------------------------------------------------------------------------- e2e / scaling / curves math


def _rows(times, steps_len=5.0, groups=2.0):
    rows = [{"step": 0, "eval/success_rate": 0.1, "eval/episodes": 4}]
    for i, t in enumerate(times):
        rows.append({"step": i + 1, "policy_version": i + 2, "time/iteration_s": t, "time/rollout_wait_s": t / 2,
                     "time/weight_sync_s": 1.0, "time/checkpoint_s": 1.5,
                     "rollout/episode_length": steps_len, "rollout/groups": groups, "rollout/success_rate": 0.25})
    return rows


def test_e2e_summary_leaves_out_warmup_and_compares_modes():
    sync = e2e.summarize_run(_rows([30.0, 10.0, 10.0]), warmup=1, group_size=8)
    assert sync["steady_iterations"] == 2 and sync["iteration_s"] == 10.0
    assert sync["env_steps_per_s"] == pytest.approx(2 * 5 * 2 * 8 / 20.0)
    assert sync["breakdown_s"]["rollout_wait_s"] == 5.0
    assert sync["breakdown_s"]["checkpoint_only_s"] == 0.5  # the learner clocks checkpoint_s from before the publish
    asy = e2e.summarize_run(_rows([30.0, 5.0, 7.0]), warmup=1, group_size=8)
    r = e2e.compare({"sync": [sync], "async": [asy]})
    assert r["async_vs_sync"] == pytest.approx(10.0 / 6.0)
    with pytest.raises(ValueError, match="warmup"):
        e2e.summarize_run(_rows([1.0]), warmup=1, group_size=8)


def test_scaling_ratios():
    pts = [{"replicas": 1, "workers": 1, "env_steps_per_s": 100.0}, {"replicas": 1, "workers": 4, "env_steps_per_s": 150.0},
           {"replicas": 2, "workers": 1, "env_steps_per_s": 90.0}, {"replicas": 2, "workers": 4, "env_steps_per_s": 180.0}]
    r = scaling.ratios(pts)
    assert r["scaling_4w_vs_1w"] == 1.5 and r["scaling_4w_vs_1w_2r"] == 2.0
    assert r["scaling_2r_vs_1r_4w"] == 1.2 and r["scaling_2r_vs_1r_1w"] == 0.9


def test_curves_aggregate_mean_and_standard_error(tmp_path):
    recs = {"proxmo": [], "grpo": []}
    for a, b in [(0.2, 0.5), (0.3, 0.6), (0.1, 0.4)]:
        rows = [{"step": 0, "eval/success_rate": a, "eval/episodes": 8},
                {"step": 1, "policy_version": 2, "rollout/success_rate": 0.3, "rollout/episode_length": 4.0,
                 "rollout/groups": 2.0, "time/iteration_s": 1.0},
                {"step": 2, "eval/success_rate": b, "eval/episodes": 8}]
        recs["proxmo"].append(curves.run_record(rows, group_size=8))
        recs["grpo"].append(curves.run_record(rows[:2], group_size=8))
    agg = curves.aggregate(recs)
    m, se = agg["proxmo"]["final"]
    assert m == pytest.approx(0.5) and se == pytest.approx(0.1 / math.sqrt(3))
    assert agg["proxmo"]["gain"][0] == pytest.approx(0.3) and agg["proxmo"]["gain"][1] == pytest.approx(0.0, abs=1e-12)
    assert [c["step"] for c in agg["proxmo"]["curve"]] == [0, 2]
    assert agg["proxmo"]["env_steps"][0] == 64.0
    assert math.isnan(agg["grpo"]["gain"][0])  # one evaluation point: no change to report
    table = curves.markdown_table("twc", agg)
    assert "| proxmo | 3 | 20.0 ± 5.8 | 50.0 ± 5.8 | 30.0 ± 0.0 |" in table
    png = curves.plot("twc", agg, recs, tmp_path / "c.png")
    assert png.stat().st_size > 1000
