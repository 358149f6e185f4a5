"""Time the learner's update alone, with and without the KL term's reference forward (no Ray, no vLLM).

Plays one batch (``learner.groups_per_batch`` x ``rollout.group_size`` twc episodes) with transformers,
then times ``Learner.update`` on copies of it, alternating ``loss.kl_coef`` = the config's and 0:

    .venv/bin/python scripts/time_update.py model.path=artifacts/tiny-model-now120

Trailing ``key=value`` arguments override deploy/configs/quickstart.yaml. BENCHMARKS.md cites what it printed.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl_probe import Player, groups_of  # noqa: E402

from services.config import load_config  # noqa: E402
from services.learner import Learner  # noqa: E402


def main(argv: list[str]) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config("deploy/configs/quickstart.yaml", argv)
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    player = Player(cfg, tok)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path).eval()
    tasks = player.envs[0].sample_tasks("train", cfg.learner.groups_per_batch, seed=5)
    groups = groups_of(tasks, player.play(model, tasks, cfg.rollout.group_size, seed=0), cfg.rollout.group_size)
    player.close()
    torch.set_num_threads(max(1, cfg.learner.torch_threads))
    times: dict[float, list[float]] = {}
    for _ in range(2):
        for kl in (cfg.loss.kl_coef, 0.0):
            learner = Learner(cfg.model.path, dataclasses.replace(cfg.learner, recompute_old_logprobs=False),
                              cfg.algorithm, dataclasses.replace(cfg.loss, kl_coef=kl))
            t = time.perf_counter()
            learner.update(copy.deepcopy(groups))
            times.setdefault(kl, []).append(time.perf_counter() - t)
    for kl, ts in times.items():
        print(f"kl_coef={kl}: update " + " / ".join(f"{x:.2f}" for x in ts) + " s", flush=True)
    with_kl, without = min(times[cfg.loss.kl_coef]), min(times[0.0])
    print(f"update_without_kl_vs_with={without / with_kl:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
