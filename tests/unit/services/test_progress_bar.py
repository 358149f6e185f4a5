"""The terminal's progress bar counts what ends the RL stage: iterations, or the rl_seconds budget."""

from __future__ import annotations

import time

from services.driver import _advance, _close, _progress


def test_time_budget_bar_follows_the_clock_not_the_iteration_cap(capsys):
    bar = _progress(200, 0, seconds=30.0, t0=time.perf_counter() - 12.0)  # 12 s of the budget already spent
    _advance(bar, {"rollout/success_rate": 0.25, "policy_version": 4.0}, 3)
    assert 12.0 <= bar.n < 20.0 and bar.total == 30
    _close(bar)
    err = capsys.readouterr().err
    assert "/30 s" in err and "it=3" in err and "success=0.25" in err
    assert "/200" not in err  # the iteration cap is only an upper bound here


def test_iteration_bar_without_a_time_budget(capsys):
    bar = _progress(5, 1)
    _advance(bar, {"rollout/success_rate": 0.5, "policy_version": 2.0}, 2)
    assert bar.n == 2 and bar.total == 5
    _close(bar)
    assert "2/5" in capsys.readouterr().err
