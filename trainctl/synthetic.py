"""`data=synthetic`: scikit-learn's `make_classification` and `make_regression`, reimplemented with NumPy
alone for the settings trainctl uses, drawing the same random numbers in the same order, so the arrays
are identical to scikit-learn's (a test holds them equal) without the second that importing
scikit-learn costs every run.

Classification follows Guyon's design for the Madelon dataset: clusters of normally distributed points
around the vertices of a hypercube in the informative subspace, two clusters per class, with random
covariance, a share `flip_y` of labels replaced at random, and the remaining features pure noise;
samples and features are shuffled. Regression is a random linear model on `n_informative` features
plus Gaussian noise.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np


def _sample_without_replacement(population: int, count: int, rng: np.random.RandomState) -> np.ndarray:
    """`sklearn.utils.random.sample_without_replacement(method="auto")`, draw for draw."""
    ratio = count / population if population else 1.0
    if 0.01 < ratio < 0.99:
        return rng.permutation(population)[:count]
    out = np.empty(count, dtype=int)
    if ratio < 0.2:  # tracking selection
        selected: set = set()
        for i in range(count):
            j = rng.randint(population)
            while j in selected:
                j = rng.randint(population)
            selected.add(j)
            out[i] = j
        return out
    out[:] = np.arange(count)  # reservoir sampling
    for i in range(count, population):
        j = rng.randint(0, i + 1)
        if j < count:
            out[j] = i
    return out


def _hypercube(samples: int, dimensions: int, rng: np.random.RandomState) -> np.ndarray:
    """Distinct binary vectors of length ``dimensions`` (the hypercube's vertices)."""
    if dimensions > 30:
        return np.hstack([rng.randint(2, size=(samples, dimensions - 30)), _hypercube(samples, 30, rng)])
    out = _sample_without_replacement(2 ** dimensions, samples, rng).astype(">u4", copy=False)
    return np.unpackbits(out.view(">u1")).reshape((-1, 32))[:, -dimensions:]


def _shuffled(x: np.ndarray, y: np.ndarray, rng: np.random.RandomState) -> Tuple[np.ndarray, np.ndarray]:
    """`sklearn.utils.shuffle(x, y, random_state=rng)`: samples permuted, features then permuted too."""
    order = np.arange(len(x))
    rng.shuffle(order)
    x, y = x[order], y[order]
    features = np.arange(x.shape[1])
    rng.shuffle(features)
    x[:, :] = x[:, features]
    return x, y


def make_classification(n_samples: int, n_features: int, n_informative: int, n_classes: int, flip_y: float,
                        seed: int, n_clusters_per_class: int = 2) -> Tuple[np.ndarray, np.ndarray]:
    """`make_classification(n_samples, n_features, n_informative=..., n_redundant=0, n_classes=...,
    flip_y=..., random_state=seed)` with its other defaults (class_sep 1, hypercube, no shift or scale)."""
    if n_informative < np.log2(n_classes * n_clusters_per_class):
        raise ValueError(f"n_classes * n_clusters_per_class must be <= 2**n_informative ({2 ** n_informative})")
    rng = np.random.RandomState(seed)
    n_clusters = n_classes * n_clusters_per_class
    per_cluster = [int(n_samples * (1.0 / n_classes) / n_clusters_per_class) for _ in range(n_clusters)]
    for i in range(n_samples - sum(per_cluster)):
        per_cluster[i % n_clusters] += 1
    x = np.zeros((n_samples, n_features))
    y = np.zeros(n_samples, dtype=int)
    centroids = _hypercube(n_clusters, n_informative, rng).astype(float, copy=False)
    centroids *= 2.0
    centroids -= 1.0
    x[:, :n_informative] = rng.standard_normal(size=(n_samples, n_informative))
    stop = 0
    for k, centroid in enumerate(centroids):
        start, stop = stop, stop + per_cluster[k]
        y[start:stop] = k % n_classes
        cluster = x[start:stop, :n_informative]
        cluster[...] = np.dot(cluster, 2 * rng.uniform(size=(n_informative, n_informative)) - 1)
        cluster += centroid
    n_random = n_features - n_informative
    if n_random > 0:
        x[:, -n_random:] = rng.standard_normal(size=(n_samples, n_random))
    if flip_y >= 0.0:
        flip = rng.uniform(size=n_samples) < flip_y
        y[flip] = rng.randint(n_classes, size=flip.sum())
    return _shuffled(x, y, rng)


def make_regression(n_samples: int, n_features: int, n_informative: int, n_targets: int, noise: float,
                    seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """`make_regression(n_samples, n_features, n_informative=..., n_targets=..., noise=..., random_state=seed)`
    with its other defaults (no bias, well-conditioned inputs)."""
    rng = np.random.RandomState(seed)
    x = rng.standard_normal(size=(n_samples, n_features))
    truth = np.zeros((n_features, n_targets))
    truth[:n_informative, :] = 100 * rng.uniform(size=(n_informative, n_targets))
    y = np.dot(x, truth)
    if noise > 0.0:
        y += rng.normal(scale=noise, size=y.shape)
    x, y = _shuffled(x, y, rng)
    return x, np.squeeze(y)
