"""`proxmo bench advantages` runs end to end on a tiny batch and writes its JSON."""

from __future__ import annotations

import json

from services.bench.advantages import main


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "adv.json"
    rc = main(["--groups", "2", "--group-size", "2", "--max-steps", "6", "--scale", "2", "--repeat", "1",
               "--estimators", "grpo,proxmo", "--json", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert lines[-1].startswith("proxmo_vs_tfidf_fit=")
    data = json.loads(out.read_text())
    assert set(data["base"]["median_ms"]) == {"tfidf_fit", "grpo", "proxmo"}
    assert data["large"]["rows"] > data["base"]["rows"]
    assert abs(data["proxmo_vs_tfidf_fit"] - float(lines[-1].split("=")[1])) < 1e-3
