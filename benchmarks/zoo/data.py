"""The zoo's datasets: small, real or generated, all shipped offline with scikit-learn.

Framework-free (numpy and scikit-learn): a runner turns the arrays into its own tensors. Every
dataset is split 75/25 into train and test (stratified for classifiers) with the run's seed,
features are standardised with the training split's mean and standard deviation (a constant
feature is left at 0), and regression targets likewise. Nothing is downloaded: ``load_*`` read
files inside the scikit-learn package and ``make_*`` generate from the seed.

>>> d = load("iris", (), seed=0)
>>> d.x_train.shape, d.x_test.shape, d.classes, round(d.chance, 2)
((112, 4), (38, 4), 3, 0.34)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TEST_SHARE = 0.25

SKLEARN_LOADERS = {
    "digits": ("load_digits", "classification"),
    "iris": ("load_iris", "classification"),
    "wine": ("load_wine", "classification"),
    "breast_cancer": ("load_breast_cancer", "classification"),
    "diabetes": ("load_diabetes", "regression"),
}
GENERATED = {
    "classification": "classification",
    "moons": "classification",
    "blobs": "classification",
    "separable": "classification",
    "regression": "regression",
}
ROWS = {"digits": 1797, "iris": 150, "wine": 178, "breast_cancer": 569, "diabetes": 442}
FEATURES = {"digits": 64, "iris": 4, "wine": 13, "breast_cancer": 30, "diabetes": 10}

Options = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class Dataset:
    """Standardised train and test arrays.

    Attributes:
        name: The dataset's name.
        task: ``"classification"`` or ``"regression"``.
        x_train: (n, features) float32.
        y_train: (n,) int64 class ids, or (n, 1) float32 targets.
        x_test: Held-out features.
        y_test: Held-out targets.
        classes: Number of classes (0 for regression).
        chance: Test accuracy of always predicting the most frequent test class (NaN for
            regression).
    """

    name: str
    task: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    chance: float

    @property
    def features(self) -> int:
        return int(self.x_train.shape[1])


def task_of(name: str) -> str:
    """``"classification"`` or ``"regression"``.

    Raises:
        ValueError: for an unknown dataset.
    """
    if name in SKLEARN_LOADERS:
        return SKLEARN_LOADERS[name][1]
    if name in GENERATED:
        return GENERATED[name]
    raise ValueError(f"Unknown dataset {name!r}; known: {sorted(SKLEARN_LOADERS) + sorted(GENERATED)}.")


def rows(name: str, options: Options) -> int:
    """Rows before the split (from the options for generated data)."""
    return ROWS[name] if name in ROWS else int(dict(options)["n_samples"])


def train_rows(name: str, options: Options) -> int:
    """Rows in the training split (what the batch count and the last batch's size follow from)."""
    n = rows(name, options)
    return n - math.ceil(TEST_SHARE * n)


def features(name: str, options: Options) -> int:
    return FEATURES[name] if name in FEATURES else int(dict(options)["n_features"])


@functools.lru_cache(maxsize=8)
def _sklearn(name: str) -> tuple[np.ndarray, np.ndarray]:
    import sklearn.datasets

    loader = getattr(sklearn.datasets, SKLEARN_LOADERS[name][0])
    x, y = loader(return_X_y=True)
    return np.asarray(x, dtype=np.float64), np.asarray(y)


def _generate(name: str, opts: dict[str, Any], seed: int) -> tuple[np.ndarray, np.ndarray]:
    import sklearn.datasets as skd

    n, rng = int(opts["n_samples"]), seed
    if name == "classification":
        return skd.make_classification(
            n_samples=n, n_features=int(opts["n_features"]), n_informative=int(opts["n_informative"]),
            n_redundant=0, n_classes=int(opts["classes"]), class_sep=float(opts["class_sep"]), flip_y=0.01,
            random_state=rng)
    if name == "moons":
        return skd.make_moons(n_samples=n, noise=float(opts["noise"]), random_state=rng)
    if name == "blobs":
        return skd.make_blobs(n_samples=n, centers=int(opts["classes"]), n_features=int(opts["n_features"]),
                              cluster_std=float(opts["cluster_std"]), random_state=rng)
    if name == "separable":
        # Two (or three) blobs 6 standard deviations apart along every axis: linearly separable.
        d, k = int(opts["n_features"]), int(opts["classes"])
        centres = np.stack([np.full(d, 6.0 * (i - (k - 1) / 2)) for i in range(k)])
        return skd.make_blobs(n_samples=n, centers=centres, cluster_std=1.0, random_state=rng)
    if name == "regression":
        return skd.make_regression(n_samples=n, n_features=int(opts["n_features"]),
                                   n_informative=int(opts["n_informative"]), noise=float(opts["noise"]),
                                   random_state=rng)
    raise ValueError(f"Unknown generated dataset {name!r}; known: {sorted(GENERATED)}.")


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def load(name: str, options: Options, seed: int) -> Dataset:
    """Load or generate ``name``, split it with ``seed`` and standardise it.

    Args:
        name: A key of :data:`SKLEARN_LOADERS` or :data:`GENERATED`.
        options: The generator's options (``n_samples``, ``n_features``...); ignored for the
            ``load_*`` datasets.
        seed: Seeds the generator and the split.

    Returns:
        The dataset.
    """
    from sklearn.model_selection import train_test_split

    task = task_of(name)
    x, y = _sklearn(name) if name in SKLEARN_LOADERS else _generate(name, dict(options), seed)
    stratify = y if task == "classification" else None
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_SHARE, random_state=seed, stratify=stratify)
    x_tr, x_te = _standardise(np.asarray(x_tr, np.float64), np.asarray(x_te, np.float64))
    if task == "classification":
        classes = int(np.max(y)) + 1
        counts = np.bincount(np.asarray(y_te, np.int64), minlength=classes)
        return Dataset(name, task, x_tr, np.asarray(y_tr, np.int64), x_te, np.asarray(y_te, np.int64),
                       classes, float(counts.max() / counts.sum()))
    t_tr, t_te = _standardise(np.asarray(y_tr, np.float64)[:, None], np.asarray(y_te, np.float64)[:, None])
    return Dataset(name, task, x_tr, t_tr, x_te, t_te, 0, math.nan)


def quantile_edges(x_train: np.ndarray, bins: int) -> np.ndarray:
    """(features, bins - 1) edges splitting each training feature into ``bins`` equal shares."""
    qs = np.linspace(0, 1, bins + 1)[1:-1]
    return np.quantile(x_train, qs, axis=0).T


def tokens(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Quantise features into bins: (n, features) int64 bin ids in ``[0, bins)``."""
    return np.stack([np.searchsorted(edges[j], x[:, j], side="right") for j in range(x.shape[1])], 1).astype(np.int64)


__all__ = ["GENERATED", "SKLEARN_LOADERS", "Dataset", "features", "load", "quantile_edges", "rows", "task_of",
           "tokens", "train_rows"]
