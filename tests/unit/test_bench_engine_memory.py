"""`proxmo bench engine-memory`: argument checks (the run itself needs the engine: see BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from services.bench.engine_memory import main


@pytest.mark.parametrize("argv", [["--rounds", "5"], ["--onednn-cache", "-1"]])
def test_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_replica_memory_rejects_bad_arguments():
    from services.bench.replica_memory import main as replica_main

    for argv in (["requests", "--rounds", "10"], ["sideways"]):
        with pytest.raises(SystemExit) as exc:
            replica_main(argv)
        assert exc.value.code == 2
