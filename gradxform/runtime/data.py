"""Datasets that need no download: scikit-learn's bundled digits, and synthetic tasks."""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ..errors import GradxformError
from .losses import logits_of


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


def synthetic(input_shape: tuple[int, ...], classes: int, samples: int = 2048, seed: int = 0,
              dtype: torch.dtype = torch.float32, depth: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """A learnable synthetic classification task shaped like the model's input.

    Labels come from a fixed random teacher on the flattened input: linear (``depth=0``), or with
    ``depth`` hidden tanh layers of width 256 (a harder, non-linear task); 20% of the samples are
    held out.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, *input_shape, generator=gen, dtype=dtype)
    h = x.flatten(1)
    for _ in range(depth):
        w = torch.randn(h.shape[1], 256, generator=gen, dtype=dtype) / h.shape[1] ** 0.5
        h = torch.tanh(2.0 * h @ w)
    teacher = torch.randn(h.shape[1], classes, generator=gen, dtype=dtype)
    y = (h @ teacher).argmax(1)
    cut = int(samples * 0.8)
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def load_data(spec: str, input_shape: tuple[int, ...], classes: int, seed: int = 0) -> tuple:
    """``digits``, ``synthetic``, ``synthetic-deep``, or ``module:function`` returning (train, test)
    datasets of (x, y)."""
    if spec == "digits":
        flat = len(input_shape) == 1
        train, test = digits(seed=seed, flat=flat)
        have = tuple(train.tensors[0].shape[1:])
        if have != tuple(input_shape):
            raise GradxformError(f"the model takes inputs of shape {tuple(input_shape)} but digits are {have}",
                                 hint="use a model for 8x8 single-channel images (e.g. examples/resnet.py:"
                                      "digits_resnet or examples/mlp.py), or --data synthetic")
        if classes != 10:
            raise GradxformError(f"the model has {classes} outputs but digits has 10 classes")
        return train, test
    if spec == "synthetic":
        return synthetic(tuple(input_shape), classes, seed=seed)
    if spec == "synthetic-deep":  # a non-linear teacher with two hidden layers, 4096 samples
        return synthetic(tuple(input_shape), classes, samples=4096, seed=seed, depth=2)
    module_name, sep, fn_name = spec.partition(":")
    if not sep:
        raise GradxformError(f"unknown --data '{spec}'", hint="use digits, synthetic, or module:function")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise GradxformError(f"--data {spec}: {e}", hint="module:function must be importable "
                             "(run from its folder or put it on PYTHONPATH)") from None
    try:
        out = fn()
    except Exception as e:  # the user's own code: say where it failed, not a traceback
        raise GradxformError(f"--data {spec} raised {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                             hint=f"run {module_name}.{fn_name}() on its own to see the whole traceback") from None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise GradxformError(f"--data {spec} returned {type(out).__name__}",
                             hint="return (train_dataset, test_dataset), each yielding (input, label)")
    return tuple(out)


def tensors_of(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of a dataset, stacked (a TensorDataset's own tensors when it is one)."""
    if hasattr(dataset, "tensors") and len(dataset.tensors) == 2:
        return dataset.tensors
    items = [dataset[i] for i in range(len(dataset))]
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    xs, ys = zip(*items)
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys)


def check_dataset(name: str, dataset: Any, input_shape: tuple[int, ...], classes: int, spec: str) -> None:
    """A dataset the model can train on: samples of the input shape, integer labels in [0, classes),
    at least one sample, finite inputs. Each failure names the set, the sample and what to fix."""
    where = f"--data {spec}: the {name} set"
    try:
        n = len(dataset)
    except TypeError:
        raise GradxformError(f"{where} has no length", hint="return map-style datasets (e.g. TensorDataset)") from None
    if n == 0:
        raise GradxformError(f"{where} is empty", hint="return at least one (input, label) sample in each set")
    try:
        x, y = tensors_of(dataset)
    except (TypeError, ValueError, RuntimeError) as e:
        raise GradxformError(f"{where}: its samples are not (input, label) pairs of tensors: {e}",
                             hint="each item must be (input tensor, integer label)") from None
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise GradxformError(f"{where} has inputs of shape {tuple(x.shape[1:])}, the model takes {tuple(input_shape)}",
                             hint="reshape the inputs, or compile the model for that shape")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() not in (1, 2):
        raise GradxformError(f"{where} has labels of dtype {str(y.dtype).replace('torch.', '')} and shape "
                             f"{tuple(y.shape)}", hint="labels are integer class indices (int64): one per sample, or one per token")
    labels = y.reshape(len(y), -1)
    outside = (labels < 0) | (labels >= classes)
    if outside.any():
        i = int(outside.any(1).nonzero()[0])
        raise GradxformError(f"{where}: sample {i} has label {int(labels[i][outside[i]][0])}, outside the model's "
                             f"{classes} classes (0..{classes - 1})",
                             hint="relabel the data, or give the model as many outputs as classes")
    if x.is_floating_point() and not torch.isfinite(x).all():
        i = int((~torch.isfinite(x.flatten(1))).any(1).nonzero()[0])
        raise GradxformError(f"{where}: sample {i} has a NaN or infinite input", hint="clean or drop that sample")


def datasets_for(staged: Any, args: tuple, kwargs: dict, spec: str, seed: int = 0) -> tuple:
    """(train, test) datasets of ``spec`` shaped for the model: the input shape from its example
    inputs, the number of classes from its output on them."""
    if kwargs or len(args) != 1:
        raise GradxformError("gradxform train feeds one input tensor per sample",
                             hint="train models whose forward takes a single tensor (x), or pass --data module:function "
                                  "with such a model")
    staged.eval()
    with torch.no_grad():
        classes = logits_of(staged(*args, **kwargs)).shape[-1]
    staged.train()
    shape = tuple(args[0].shape[1:])
    train, test = load_data(spec, shape, classes, seed)
    for name, dataset in (("training", train), ("test", test)):
        check_dataset(name, dataset, shape, classes, spec)
    return train, test
