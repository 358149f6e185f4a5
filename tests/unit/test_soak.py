"""`proxmo bench soak` analysis: slopes per process over the second half, on synthetic samples,
and one real sample of this process tree (psutil, no Ray)."""

from __future__ import annotations

import os

import pytest

from services.bench.soak import MemorySampler, Sample, analyse, label_of


def _series(pid, label, start, per_min, n=21, step_s=30.0):
    return [Sample(i * step_s, pid, label, start + per_min * i * step_s / 60, start + per_min * i * step_s / 60)
            for i in range(n)]


def test_slopes_are_fitted_on_the_second_half_and_the_max_is_reported():
    flat = _series(1, "ray::Learner", 500.0, 0.0)
    leak = _series(2, "ray::_RolloutActor", 300.0, 2.5)
    # Start-up growth in the first half only must not count.
    warm = [Sample(s.t_s, 3, "VLLM::EngineCore", (s.pss_mb + 400.0) if s.t_s >= 300 else s.pss_mb + s.t_s,
                   (s.pss_mb + 400.0) if s.t_s >= 300 else s.pss_mb + s.t_s) for s in _series(3, "x", 100.0, 0.0)]
    gone = _series(4, "ray::_RolloutActor", 200.0, 50.0, n=5)  # a replaced worker: not fitted
    out = analyse(flat + leak + warm + gone)
    slopes = {p["pid"]: p["slope_mb_per_min"] for p in out["processes"]}
    assert slopes[1] == pytest.approx(0.0, abs=1e-6)
    assert slopes[2] == pytest.approx(2.5, rel=1e-6)
    assert slopes[3] == pytest.approx(0.0, abs=1e-6)
    assert slopes[4] is None
    assert out["max_growth_mb_per_min"] == pytest.approx(2.5, rel=1e-6)
    assert out["total_slope_mb_per_min"] == pytest.approx(2.5, rel=1e-3)


def test_analysis_window_starts_at_training():
    # Growth before t_from (start-up) is excluded even if it lasts past the run's midpoint.
    mb = [(t, 100 + 50 * min(t, 540) / 60) for t in range(0, 960, 60)]  # grows until 9 min, then flat
    s = [Sample(t, 1, "driver", m, m) for t, m in mb]
    assert analyse(s, t_from=300)["max_growth_mb_per_min"] == pytest.approx(0.0, abs=1e-9)
    assert analyse(s)["max_lsq_growth_mb_per_min"] > 0  # the growth from 7.5 to 9 min is in the window


def test_the_trend_ignores_transient_peaks_and_still_sees_a_leak():
    # A learner-like process: a flat floor with one allocator peak late in the run (soak4: +300 MB).
    floor = [Sample(t, 1, "ray::LearnerWorker", 1050.0, 1050.0) for t in range(0, 1200, 10)]
    floor[100] = Sample(1000, 1, "ray::LearnerWorker", 1366.0, 1366.0)
    out = analyse(floor)
    proc = out["processes"][0]
    assert proc["slope_mb_per_min"] > 0.5  # least squares is pulled up by one sample
    assert proc["trend_mb_per_min"] == pytest.approx(0.0, abs=1e-9)
    assert out["max_growth_mb_per_min"] == pytest.approx(0.0, abs=1e-9)
    # A real leak with the same peak is still reported at its rate.
    leak = [Sample(s.t_s, 2, "driver", s.pss_mb + 0.5 * s.t_s / 60, s.pss_mb + 0.5 * s.t_s / 60) for s in floor]
    assert analyse(leak)["max_growth_mb_per_min"] == pytest.approx(0.5, abs=1e-6)


def test_no_samples_is_an_error():
    with pytest.raises(ValueError):
        analyse([])


def test_a_real_sample_of_this_process_tree():
    sampler = MemorySampler(interval_s=60)
    assert sampler.sample_once() >= 1
    me = [s for s in sampler.samples if s.pid == os.getpid()]
    assert me and me[0].label == "driver" and me[0].pss_mb > 10 and me[0].rss_mb >= me[0].pss_mb * 0.5
    assert 0 < me[0].uss_mb <= me[0].pss_mb + 1.0  # private memory is part of the proportional share
    assert analyse(sampler.samples, metric="uss_mb")["processes"][0]["last_mb"] > 0
    import psutil

    assert label_of(psutil.Process(os.getpid()), os.getpid()) == "driver"
