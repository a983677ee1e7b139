"""Datasets that need no download: scikit-learn's bundled digits, and synthetic tasks."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def digits(test_fraction: float = 0.2, seed: int = 0, flat: bool = False) -> tuple[TensorDataset, TensorDataset]:
    """The 8x8 handwritten digits shipped with scikit-learn (1797 images, 10 classes).

    Images are scaled to [0, 1] and standardised with the training set's mean and std; ``flat`` gives
    (N, 64) vectors instead of (N, 1, 8, 8) images. The split is stratified and fixed by ``seed``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=test_fraction, random_state=seed,
                                           stratify=data.target)
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    shape = (-1, 64) if flat else (-1, 1, 8, 8)
    return (TensorDataset(x_train.reshape(shape), y[idx_train]),
            TensorDataset(x_test.reshape(shape), y[idx_test]))
