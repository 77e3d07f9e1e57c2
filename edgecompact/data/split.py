"""Seeded, class-stratified index splits, used for train/val, for `limit` subsets and for the digits test set."""

from __future__ import annotations

import numpy as np


def stratified_take(labels: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split range(len(labels)) into (n picked indices, the rest), each class giving its share of the n.

    Shares are proportional to class sizes; the slots left after rounding down go to the classes with the
    largest remainders (ties broken by `rng`). Both outputs are sorted, so they keep the file order.
    """
    if not 0 <= n <= len(labels):
        raise ValueError(f"cannot take {n} of {len(labels)} indices")
    by_class = np.argsort(labels, kind="stable")
    _, counts = np.unique(labels, return_counts=True)
    quota = counts * (n / len(labels))
    share = np.floor(quota).astype(np.int64)
    order = np.lexsort((rng.random(len(counts)), share - quota))
    share[order[: n - int(share.sum())]] += 1
    picked, rest = [], []
    for members, k in zip(np.split(by_class, np.cumsum(counts)[:-1]), share):
        members = rng.permutation(members)
        picked.append(members[:k])
        rest.append(members[k:])
    return np.sort(np.concatenate(picked)), np.sort(np.concatenate(rest))
