"""ProxMO proximity-based soft aggregation of the step baseline (ProxMO Sec. 4.2).

For rows i, j of the same episode group, with unit state features x:
    c_ij = cos(x_i, x_j),   w_ij = softmax_j(c_ij / tau)   (j over the group, i included)
    b_i  = sum_j w_ij G~_j,   A_S_i = G~_i - b_i

Departures from the reference code (numbers unchanged up to float rounding):
- The reference builds one N x N similarity matrix for the whole batch and masks it by
  group. We work on each group's *distinct* anchor texts: with counts M_u and return sums
  S_u per distinct text u, b_a = sum_u e^(c_au/tau) S_u / sum_u e^(c_au/tau) M_u.
  For sparse non-negative features (TF-IDF) all groups go through one sparse product whose
  output holds only within-group cosines; other features use one dense Gram per group.
  Memory follows (distinct states) x (largest group's distinct states), never N^2.
- TF-IDF (scikit-learn, ``TfidfVectorizer(max_features=1024)`` fit on all rows of the batch)
  is reproduced from counts of the distinct texts weighted by how often each occurs:
  term totals for the max_features cut, document frequencies and the idf are those of the
  fit on all rows, bit for bit (same integer totals, same argsort, same float64 ops); the
  normalised rows may differ in the last bit (order of the sum of squares). Only the
  tokenising is done once per distinct text.
- Featurizers are pluggable (``featurizer`` = "tfidf" or "module:attr" of a callable
  ``(texts, counts, cfg) -> [U, D] array``; counts say how often each text occurs), e.g.
  sentence embeddings for semantic proximity.
- If no text yields a token (empty vocabulary, e.g. only empty strings or 1-char tokens)
  every feature is zero, all cosines are 0, and the baseline falls back to the group mean.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.preprocessing import normalize

# (distinct texts, how often each occurs in the batch, AdvantageConfig) -> features [U, D],
# a dense array or a scipy-style sparse matrix (anything with .tocsr())
Featurizer = Callable[[list[str], np.ndarray, Any], np.ndarray]
_FEATURIZERS: dict[str, Featurizer] = {}


def register_featurizer(name: str, fn: Featurizer) -> None:
    """Add a named featurizer; names are unique."""
    if name in _FEATURIZERS:
        raise ValueError(f"featurizer {name!r} is already registered")
    _FEATURIZERS[name] = fn


def get_featurizer(name: str) -> Featurizer:
    if name in _FEATURIZERS:
        return _FEATURIZERS[name]
    if ":" in name:
        module, attr = name.split(":", 1)
        return getattr(importlib.import_module(module), attr)
    raise ValueError(f"unknown featurizer {name!r}; known: {sorted(_FEATURIZERS)} or 'module:attr'")


def tfidf_fit(texts: list[str], counts: np.ndarray, max_features: int | None):
    """(terms [V], idf [V], term counts [U, V] sparse) of TfidfVectorizer(max_features) fit on all rows,
    where distinct text u occurs counts[u] times. None when the vocabulary is empty.

    Mirrors TfidfVectorizer defaults (lowercase, token_pattern, smooth_idf).
    """
    cv = CountVectorizer()
    try:
        x = cv.fit_transform(texts)  # vocabulary sorted by term, int64 counts
    except ValueError:  # empty vocabulary: no text has a token of 2+ word characters
        return None
    terms = cv.get_feature_names_out()
    mult = np.asarray(counts, dtype=np.int64)
    if max_features is not None and x.shape[1] > max_features:
        totals = np.asarray(x.T @ mult).ravel().astype(np.int64)  # term totals over all rows
        keep = np.zeros(x.shape[1], dtype=bool)
        keep[(-totals).argsort()[:max_features]] = True  # same call and dtype as scikit-learn
        cols = np.flatnonzero(keep)
        x, terms = x[:, cols], terms[cols]
    present = x.copy()
    present.data = np.ones_like(present.data)
    df = np.asarray(present.T @ mult).ravel().astype(np.float64)
    df += 1.0
    idf = np.full_like(df, fill_value=int(mult.sum()) + 1, dtype=np.float64)
    idf /= df
    np.log(idf, out=idf)
    idf += 1.0
    return terms, idf, x


def tfidf_features(texts: list[str], counts: np.ndarray, max_features: int | None):
    """L2-normalised TF-IDF rows [U, V] (sparse CSR) of the distinct ``texts`` (see tfidf_fit);
    zeros [U, 1] (dense) for an empty vocabulary."""
    fit = tfidf_fit(texts, counts, max_features)
    if fit is None:
        return np.zeros((len(texts), 1), dtype=np.float64)
    _, idf, x = fit
    x = x.astype(np.float64)
    x.data *= idf[x.indices]
    return normalize(x, norm="l2", copy=False).tocsr()


def _tfidf(texts: list[str], counts: np.ndarray, cfg: Any) -> np.ndarray:
    return tfidf_features(texts, counts, cfg.tfidf_max_features)


register_featurizer("tfidf", _tfidf)


def is_sparse(x: Any) -> bool:
    return hasattr(x, "tocsr") and hasattr(x, "nnz")


def unit_rows(features: Any):
    """x / (||x|| + 1e-8) per row, as the reference (all-zero rows stay zero); dense stays dense,
    sparse becomes CSR."""
    if is_sparse(features):
        f = features.tocsr().astype(np.float64)
        norms = np.sqrt(np.asarray(f.multiply(f).sum(axis=1)).ravel())
        f.data /= np.repeat(norms + 1e-8, np.diff(f.indptr))
        return f
    f = np.asarray(features, dtype=np.float64)
    return f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-8)


def _gram(f: Any) -> np.ndarray:
    """f f^T without BLAS: the matrices are small and many, and a threaded BLAS on a busy
    2-core host spent ~30x longer in thread hand-off than in arithmetic (measured)."""
    if is_sparse(f):
        return (f @ f.T).toarray()
    return np.einsum("id,jd->ij", f, f)


def soft_step_advantage(step_return: np.ndarray, group: np.ndarray, text_code: np.ndarray,
                        features: Any, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(A_S [N], baseline [N]) from G~ [N], group codes [N], distinct-text codes [N] and unit features [U, D].

    Works on (group, distinct text) pairs: M = rows per pair, S = sum of G~ per pair.
    """
    n = step_return.shape[0]
    if n == 0:
        return np.zeros(0), np.zeros(0)
    n_text = int(text_code.max()) + 1
    keys, inv = np.unique(group * n_text + text_code, return_inverse=True)  # pairs sorted by group
    inv = inv.reshape(-1)
    pair_group, pair_text = keys // n_text, keys % n_text
    m = np.bincount(inv, minlength=keys.size).astype(np.float64)
    s = np.bincount(inv, weights=step_return, minlength=keys.size)
    if is_sparse(features) and (features.nnz == 0 or features.data.min() >= 0):
        b = _pair_baseline_sparse(features, pair_group, pair_text, m, s, temperature)
    else:
        b = _pair_baseline_dense(features, pair_group, pair_text, m, s, temperature)
    baseline = b[inv]
    return step_return - baseline, baseline


def _pair_baseline_dense(features: Any, pair_group: np.ndarray, pair_text: np.ndarray, m: np.ndarray,
                         s: np.ndarray, temperature: float) -> np.ndarray:
    """One small Gram matrix per group (any features, negative entries allowed)."""
    b = np.empty(m.shape[0], dtype=np.float64)
    bounds = np.flatnonzero(np.diff(pair_group)) + 1
    for lo, hi in zip(np.concatenate(([0], bounds)), np.concatenate((bounds, [m.shape[0]])), strict=True):
        logits = _gram(features[pair_text[lo:hi]]) / temperature
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        b[lo:hi] = np.einsum("ij,j->i", e, s[lo:hi]) / np.einsum("ij,j->i", e, m[lo:hi])
    return b


def _pair_baseline_sparse(features: Any, pair_group: np.ndarray, pair_text: np.ndarray, m: np.ndarray,
                          s: np.ndarray, temperature: float) -> np.ndarray:
    """All groups in one sparse product, for non-negative sparse features (TF-IDF).

    Each pair's features are moved to its group's own block of columns, so F F^T holds
    exactly the within-group cosines that are non-zero (memory <= pairs x largest group).
    Pairs with cosine 0 weigh e^(0 - max) each; their sums come from the group totals.
    """
    n_pairs, dim = m.shape[0], features.shape[1]
    f = features.tocsr()[pair_text]
    f.indices = (f.indices + np.repeat(pair_group, np.diff(f.indptr)) * dim).astype(np.int64)
    f = type(f)((f.data, f.indices, f.indptr), shape=(n_pairs, dim * (int(pair_group.max()) + 1)))
    c = (f @ f.T).tocsr()
    starts, counts = c.indptr[:-1], np.diff(c.indptr)
    nonempty = counts > 0  # a pair whose text has no feature has no stored cosine at all

    def row_sum(values: np.ndarray) -> np.ndarray:  # rows are contiguous in CSR
        out = np.zeros(n_pairs)
        if values.size:
            out[nonempty] = np.add.reduceat(values, starts[nonempty])
        return out

    logits = c.data / temperature
    top = np.zeros(n_pairs)  # max over the row incl. the implicit zeros (cos >= 0 here)
    if logits.size:
        top[nonempty] = np.maximum(np.maximum.reduceat(logits, starts[nonempty]), 0.0)
    e = np.exp(logits - np.repeat(top, counts))
    e0 = np.exp(-top)  # weight of each pair with cosine 0
    s_col, m_col = s[c.indices], m[c.indices]
    g_s = np.bincount(pair_group, weights=s)[pair_group]
    g_m = np.bincount(pair_group, weights=m)[pair_group]
    num = row_sum(e * s_col) + e0 * (g_s - row_sum(s_col))
    den = row_sum(e * m_col) + e0 * (g_m - row_sum(m_col))
    return num / den
