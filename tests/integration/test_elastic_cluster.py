"""Nodes join and leave a real multi-node Ray cluster while training goes on (issue 7 item 4).

The scenario runs in its own process (tests/integration/elastic_cluster_job.py) because it needs a
Ray cluster of its own; it starts its own vLLM engine, so it is marked slow (`make test-all`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_rollout_workers_follow_nodes_joining_and_leaving():
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tests.integration.elastic_cluster_job"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(seen["it2_nodes"]) == 2 and len(seen["it3_nodes"]) == 1
    assert seen["replaced"] >= 1
    assert seen["stats"]["produced"] == 6
