"""Held-out linear probes (logistic regression) on captured activations."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["ProbeResult", "fit_probe", "split_indices"]


@dataclass(frozen=True)
class ProbeResult:
    train_acc: float
    test_acc: float


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test split, fixed by `seed`, shared by every probe of one scan."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, round(len(idx) * test_fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.concatenate(train), np.concatenate(test)


def fit_probe(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int = 0) -> ProbeResult:
    """Standardise, fit L2 logistic regression on `train`, score accuracy on both parts."""
    if np.ptp(x[train], axis=0).max() == 0:  # identical inputs (e.g. the same token's embedding)
        majority = np.bincount(y[train]).argmax()
        return ProbeResult(float((y[train] == majority).mean()), float((y[test] == majority).mean()))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(x[train], y[train])
    return ProbeResult(float(clf.score(x[train], y[train])), float(clf.score(x[test], y[test])))
