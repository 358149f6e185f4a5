"""GiGPO step grouping: anchor-state buckets inside an episode group, and the step term.

A_S = G~ - mean_bucket(G~)   or   (G~ - mean_bucket(G~)) / (std_bucket(G~) + eps)
A bucket holding one row gets A_S = 0 (reference: mean = itself, std = 1).

Departures from the reference code:
- Exact match works on any hashable anchor and on JSON-able ones (lists, dicts: keyed by
  canonical JSON), not only on strings.
- Similarity clustering (difflib ratio >= threshold against each cluster's first member,
  as the reference) visits a group's distinct anchor texts in sorted order instead of row
  order, so the clusters do not depend on how the batch was shuffled. Identical texts
  always share a cluster. difflib's cheap upper bounds (real_quick_ratio, quick_ratio)
  are checked first; they never change the outcome.
"""

from __future__ import annotations

from difflib import SequenceMatcher

import numpy as np

from proxmo.episode import EPS, group_mean_std


def exact_buckets(group: np.ndarray, anchor: np.ndarray) -> tuple[np.ndarray, int]:
    """Bucket code per row [N] for (group, identical anchor) pairs."""
    if group.size == 0:
        return np.zeros(0, dtype=np.int64), 0
    key = group * (int(anchor.max()) + 1) + anchor
    uniq, inv = np.unique(key, return_inverse=True)
    return inv.reshape(-1).astype(np.int64), int(uniq.size)


def similarity_buckets(group: np.ndarray, anchor: np.ndarray, texts: list[str], threshold: float) -> tuple[np.ndarray, int]:
    """Bucket code per row [N]: greedy difflib clustering of anchor texts within each group."""
    pair_bucket, n_pairs = exact_buckets(group, anchor)
    pair_group = np.zeros(n_pairs, dtype=np.int64)
    pair_group[pair_bucket] = group
    pair_anchor = np.zeros(n_pairs, dtype=np.int64)
    pair_anchor[pair_bucket] = anchor
    cluster_of_pair = np.zeros(n_pairs, dtype=np.int64)
    next_id = 0
    order = np.argsort(pair_group, kind="stable")
    bounds = np.flatnonzero(np.diff(pair_group[order])) + 1
    for pairs in np.split(order, bounds):
        by_text: dict[str, list[int]] = {}
        for pr in pairs.tolist():
            by_text.setdefault(texts[int(pair_anchor[pr])], []).append(pr)
        reps: list[tuple[SequenceMatcher, int]] = []
        for text in sorted(by_text):
            cid = None
            for matcher, rep_id in reps:
                matcher.set_seq1(text)
                if (matcher.real_quick_ratio() >= threshold and matcher.quick_ratio() >= threshold
                        and matcher.ratio() >= threshold):
                    cid = rep_id
                    break
            if cid is None:
                cid = next_id
                next_id += 1
                m = SequenceMatcher(None, autojunk=True)
                m.set_seq2(text)  # the representative is seq2: difflib caches its index
                reps.append((m, cid))
            cluster_of_pair[by_text[text]] = cid
    return cluster_of_pair[pair_bucket], next_id


def step_advantage_buckets(step_return: np.ndarray, bucket: np.ndarray, n_buckets: int,
                           norm_by_std: bool) -> np.ndarray:
    """GiGPO step term A_S [N] from penalised step returns and bucket codes."""
    cnt, mean, std = group_mean_std(step_return, bucket, n_buckets)
    adv = step_return - mean[bucket]
    if norm_by_std:
        adv = adv / (std[bucket] + EPS)
    return np.where(cnt[bucket] <= 1, 0.0, adv)
