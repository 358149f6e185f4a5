"""A deliberately naive re-statement of the reference semantics, for cross-checking.

Written from the golden file's description, row by row with Python loops, one N x N
similarity matrix for the whole batch and a plain TfidfVectorizer fit on all rows, in
float32 torch like the reference. Slow and obvious on purpose: the fast code in proxmo/ is
checked against it on batches the golden file does not contain.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer


def _stats(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float32)
    return float(t.mean()), float(t.std())


def naive_reference(rows: list[dict], mode: str, modulation: bool, alpha: float, beta: float, gamma: float = 0.95,
                    step_weight: float = 1.0, invalid_penalty: float = 0.1, temperature: float = 0.1,
                    tfidf_max_features: int = 1024) -> dict[str, np.ndarray]:
    n = len(rows)
    pen = [invalid_penalty * (1 - r["valid"]) for r in rows]
    score = [r["episode_reward"] - pen[i] for i, r in enumerate(rows)]
    # discounted returns: walk each trajectory backwards in step order
    by_traj = defaultdict(list)
    for i, r in enumerate(rows):
        by_traj[r["traj"]].append(i)
    ret = [0.0] * n
    for idx in by_traj.values():
        running = 0.0
        for i in sorted(idx, key=lambda i: rows[i]["step"], reverse=True):
            running = rows[i]["reward"] + gamma * running
            ret[i] = running
    ret = [ret[i] - pen[i] for i in range(n)]
    # episode term over the group's rows
    by_group = defaultdict(list)
    for i, r in enumerate(rows):
        by_group[r["group"]].append(i)
    ep = [0.0] * n
    weight = [1.0] * n
    for idx in by_group.values():
        if len(idx) == 1:
            mean, std = 0.0, 1.0
        else:
            mean, std = _stats([score[i] for i in idx])
        p = min(max(float(np.mean([score[i] for i in idx])), 0.0), 1.0)
        for i in idx:
            if mode == "mean_std_norm":
                ep[i] = (score[i] - mean) / (std + 1e-6)
            else:
                ep[i] = score[i] - mean
            if modulation:
                if score[i] > 0.5:
                    weight[i] = 1 + beta * (1 / (1 + math.exp(-((1 - p) ** alpha))) - 0.5)
                else:
                    weight[i] = 1 + beta * (1 / (1 + math.exp(p ** alpha)) - 0.5)
                ep[i] *= weight[i]
    st = [0.0] * n
    if mode == "soft_grouping":
        obs = [r["obs"] for r in rows]
        x = TfidfVectorizer(max_features=tfidf_max_features).fit_transform(obs).toarray()
        x = torch.tensor(x, dtype=torch.float32)
        x = x / (x.norm(dim=1, keepdim=True) + 1e-8)
        cos = x @ x.T
        g = [r["group"] for r in rows]
        same = torch.tensor([[g[i] == g[j] for j in range(n)] for i in range(n)])
        logits = (cos / temperature).masked_fill(~same, float("-inf"))
        w = torch.softmax(logits, dim=1)
        base = w @ torch.tensor(ret, dtype=torch.float32)
        st = [ret[i] - float(base[i]) for i in range(n)]
    else:
        buckets = defaultdict(list)
        for i, r in enumerate(rows):
            buckets[(r["group"], r["obs"])].append(i)
        for idx in buckets.values():
            if len(idx) == 1:
                st[idx[0]] = 0.0
                continue
            mean, std = _stats([ret[i] for i in idx])
            for i in idx:
                st[i] = (ret[i] - mean) / (std + 1e-6) if mode == "mean_std_norm" else ret[i] - mean
    adv = [ep[i] + step_weight * st[i] for i in range(n)]
    return {k: np.asarray(v, dtype=np.float64) for k, v in
            {"episode_score": score, "step_return": ret, "episode_adv": ep, "step_adv": st, "advantage": adv}.items()}
