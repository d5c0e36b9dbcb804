"""The doctor benchmark's datasets: scikit-learn's offline ones, nothing downloaded.

Each is split 75/25 into train and test (stratified) with seed 0 and standardised with the
training split's statistics. ``digits-seq`` and ``classification-seq`` are the same kind of data
read as sequences, for the recurrent cases: an 8x8 digit as 8 rows of 8 pixels, 24 generated
features as 6 steps of 4.

>>> d = load("wine")
>>> d.x_train.shape, d.x_test.shape, d.classes
((133, 13), (45, 13), 3)
>>> load("digits-seq").x_train.shape[1:]
(8, 8)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

DATASETS = ("digits", "wine", "moons", "circles", "classification", "breast_cancer", "digits-seq", "classification-seq")
SEQUENCES = ("digits-seq", "classification-seq")


@dataclass(frozen=True)
class Dataset:
    """Standardised train and test splits."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int

    @property
    def sequence(self) -> bool:
        return self.x_train.ndim == 3


def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    if name in ("digits", "digits-seq"):
        return datasets.load_digits(return_X_y=True)
    if name == "wine":
        return datasets.load_wine(return_X_y=True)
    if name == "breast_cancer":
        return datasets.load_breast_cancer(return_X_y=True)
    if name == "moons":
        return datasets.make_moons(n_samples=1000, noise=0.25, random_state=0)
    if name == "circles":
        return datasets.make_circles(n_samples=1000, noise=0.1, factor=0.5, random_state=0)
    if name == "classification":
        return datasets.make_classification(n_samples=2000, n_features=20, n_informative=10, n_classes=4,
                                            n_clusters_per_class=2, random_state=0)
    if name == "classification-seq":
        return datasets.make_classification(n_samples=2000, n_features=24, n_informative=12, n_classes=4,
                                            n_clusters_per_class=1, random_state=1)
    raise ValueError(f"Unknown dataset {name!r}; the doctor benchmark has {DATASETS}.")


@functools.cache
def load(name: str) -> Dataset:
    """The dataset ``name`` (one of :data:`DATASETS`), split and standardised."""
    from sklearn.model_selection import train_test_split

    x, y = _raw(name)
    x_train, x_test, y_train, y_test = train_test_split(x.astype(np.float64), y, test_size=0.25, random_state=0, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    if name == "digits-seq":
        x_train, x_test = x_train.reshape(-1, 8, 8), x_test.reshape(-1, 8, 8)
    elif name == "classification-seq":
        x_train, x_test = x_train.reshape(-1, 6, 4), x_test.reshape(-1, 6, 4)
    return Dataset(name, x_train.astype(np.float32), y_train.astype(np.int64), x_test.astype(np.float32),
                   y_test.astype(np.int64), int(len(np.unique(y))))
