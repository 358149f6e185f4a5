"""`proxmo bench buffer`'s arithmetic and argument checks (no Redis, no processes)."""

from __future__ import annotations

import math
import os
import time

import pytest

from services.bench import buffer as bench


def _run(wall: float, prod: float, learner: float, server: float, **extra: float) -> dict[str, float]:
    return {"wall_s": wall, "producer_cpu_s": prod, "learner_cpu_s": learner, "server_cpu_s": server, **extra}


def test_summary_rates_and_ratios():
    runs = {
        "raw": [_run(1.0, 0.2, 0.0, 0.3), _run(3.0, 0.2, 0.0, 0.3), _run(2.0, 0.2, 0.0, 0.3)],
        "concurrent": [_run(8.0, 0.8, 0.6, 0.6)],
        "phased": [_run(9.0, 0.8, 0.6, 0.6, push_s=4.0, read_s=5.0)],
    }
    s = bench._summarize(10, runs)
    assert s["raw_groups_per_s"] == pytest.approx(5.0)  # median raw wall 2 s for 10 groups
    assert s["buffer_groups_per_s"] == pytest.approx(1.25)
    assert s["ratio"] == pytest.approx(2.0 / 8.0)
    assert s["push_only_groups_per_s"] == pytest.approx(2.5)
    assert s["read_ack_only_groups_per_s"] == pytest.approx(2.0)
    assert s["own_cores_ratio"] == pytest.approx(2.0 / 5.0)  # the slower side bounds the pipeline
    assert s["one_core_ratio"] == pytest.approx(2.0 / 9.0)
    assert s["concurrent_producer_cpu_ms"] == pytest.approx(80.0)
    assert s["cpu_ratio"] == pytest.approx((0.2 + 0.3) / (0.8 + 0.6 + 0.6))


def test_summary_without_server_cpu_has_no_cpu_ratio():
    nan = float("nan")
    runs = {"raw": [_run(1.0, 0.1, 0.0, nan)], "concurrent": [_run(2.0, 0.1, 0.1, nan)],
            "phased": [_run(3.0, 0.1, 0.1, nan, push_s=1.0, read_s=1.0)]}
    assert math.isnan(bench._summarize(4, runs)["cpu_ratio"])


def test_process_cpu_from_proc():
    if not os.path.exists(f"/proc/{os.getpid()}/stat"):
        pytest.skip("no /proc")
    before = bench._server_cpu(os.getpid())
    end = time.process_time() + 0.08
    while time.process_time() < end:
        pass
    after = bench._server_cpu(os.getpid())
    assert after - before >= 0.05  # /proc counts 10 ms ticks
    assert math.isnan(bench._server_cpu(None)) and math.isnan(bench._server_cpu(2**30))


@pytest.mark.parametrize("argv", [["--sizes", "huge"], ["--producers", "0"], ["--repeat", "0"],
                                  ["--sizes", "small", "--small-groups", "1", "--producers", "2"]])
def test_bad_arguments_are_refused_before_anything_starts(argv):
    with pytest.raises(SystemExit):
        bench.main(argv)
