"""A user's dataset from one array file (.npy, .npz or .pt), validated on load.

Accepted contents:

- one array of shape (N, D), (N, H, W) or (N, C, H, W): a ``.npy`` file, a ``.npz`` with one array
  (or an array named ``x``), or a ``.pt`` file holding one tensor (or a dict with ``"x"``). It is split
  like the digits: ``perm = numpy.random.default_rng(0).permutation(N)``, then the first 2/3 of
  ``perm`` train, the next 1/6 valid, the rest test;
- three arrays named ``train``, ``valid`` and ``test`` (a ``.npz``, or a ``.pt`` dict): the user's own split.

The values declare their domain: ``"binary"`` (exactly 0 and 1) or ``"levels"`` (L grey levels: an
integer array holds 0..L-1, a float array the levels k / (L - 1) in [0, 1]); either way the Dataset holds
float32 values in [0, 1]. ``.npy`` and ``.npz`` are read with ``allow_pickle=False`` and ``.pt`` with
``torch.load(weights_only=True)``, so no file runs code when it is read.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from gapbench.data.dataset import Dataset, check_binary, check_finite, check_levels
from gapbench.data.errors import DataError

SPLIT_SEED = 0
DOMAINS = ("binary", "levels")
SUFFIXES = (".npy", ".npz", ".pt")
SPLIT_NAMES = ("train", "valid", "test")


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The file's arrays by name ("x" for a single array); DataError for anything else."""
    fix = "save a numeric array with numpy.save / numpy.savez or a tensor with torch.save"
    try:
        if path.suffix == ".npy":
            return {"x": np.load(path, allow_pickle=False)}
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{path} cannot be read as a {path.suffix} array file ({detail}). Fix: {fix} "
                        "(no pickled objects).") from None
    if isinstance(loaded, torch.Tensor):
        return {"x": loaded.numpy()}
    if isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return {str(k): v.numpy() for k, v in loaded.items()}
    raise DataError(f"{path} holds a {type(loaded).__name__}, not a tensor or a dict of tensors. Fix: {fix}.")


def _choose(arrays: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """{"x": all} or {"train", "valid", "test"}."""
    if set(SPLIT_NAMES) <= set(arrays):
        return {name: arrays[name] for name in SPLIT_NAMES}
    if len(arrays) == 1 or "x" in arrays:
        return {"x": arrays["x"] if "x" in arrays else next(iter(arrays.values()))}
    raise DataError(f"{path} holds the arrays {sorted(arrays)}; gapbench reads one array (or one named 'x') or "
                    "three named 'train', 'valid' and 'test'. Fix: save the data under those names.")


def _to_unit(array: np.ndarray, what: str, *, domain: str, num_levels: int) -> torch.Tensor:
    """(N, ...) numbers -> float32 values in [0, 1], checked against the domain."""
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{what}: dtype {array.dtype} is not numeric. Fix: store numbers (integers or floats).")
    top = 1 if domain == "binary" else num_levels - 1
    if np.issubdtype(array.dtype, np.integer):
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low < 0 or high > top:
            raise DataError(f"{what}: integer values span [{low}, {high}], but data.domain = {domain!r} "
                            f"{'holds 0 and 1' if domain == 'binary' else f'with {num_levels} levels holds 0..{top}'}. "
                            "Fix: declare the right data.domain / data.num_levels, or rescale the data.")
        x = torch.from_numpy(array.astype(np.float64) / top).float()
    else:
        x = torch.from_numpy(np.ascontiguousarray(array)).float()
    check_finite(x, what)
    if domain == "binary":
        check_binary(x, what)
    else:
        check_levels(x, num_levels, what)
    return x


def _image_shape(shape: tuple[int, ...], what: str) -> tuple[int, ...]:
    """(N, D) -> (D,) as (1, D); (N, H, W) -> (H, W); (N, C, H, W) -> (C, H, W)."""
    if len(shape) not in (2, 3, 4) or shape[0] == 0 or 0 in shape:
        raise DataError(f"{what}: shape {shape}; gapbench reads (N, D) vectors, (N, H, W) or (N, C, H, W) images "
                        "with N > 0. Fix: reshape the array so that datapoints lie along the first axis.")
    return (1, shape[1]) if len(shape) == 2 else tuple(shape[1:])


def load_file_dataset(path: str | os.PathLike[str], *, domain: str, num_levels: int = 256) -> Dataset:
    """The dataset in the array file ``path`` (see the module docstring for what it may hold).

    Parameters
    ----------
    path : a ``.npy``, ``.npz`` or ``.pt`` file
    domain : ``"binary"`` (0/1 values) or ``"levels"`` (``num_levels`` grey levels)
    num_levels : L, for ``domain = "levels"``

    Returns
    -------
    Dataset named ``file:<file name>``, values float32 in [0, 1] flattened to (N, D), with the file's
    sha256, shapes and split rule in ``provenance``.

    Raises
    ------
    DataError
        A missing or unreadable file, a wrong suffix, shape or dtype, NaN or infinite values, values
        outside the declared domain.
    """
    path = Path(path)
    if domain not in DOMAINS:
        raise DataError(f"unknown data.domain {domain!r}. Fix: use one of {', '.join(DOMAINS)}.")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown suffix {path.suffix!r}. Fix: save the data as one of {', '.join(SUFFIXES)}.")
    if not path.is_file():
        raise DataError(f"data.file {path} does not exist. Fix: give the path of the array file (relative paths "
                        "are read from the current directory).")
    arrays = _choose(_read_arrays(path), path)
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    image_shapes = {name: _image_shape(shape, f"{path} array {name!r}") for name, shape in shapes.items()}
    if len(set(image_shapes.values())) != 1:
        raise DataError(f"{path}: the splits have different datapoint shapes {shapes}. Fix: give every split "
                        "the same shape after the first axis.")
    image_shape = next(iter(image_shapes.values()))
    tensors = {name: _to_unit(a, f"{path} array {name!r}", domain=domain, num_levels=num_levels).reshape(len(a), -1)
               for name, a in arrays.items()}  # (N, D) each
    if "x" in tensors:
        x = tensors.pop("x")
        n = x.shape[0]
        num_train, num_valid = (2 * n) // 3, n // 6
        if min(num_train, num_valid, n - num_train - num_valid) < 1:
            raise DataError(f"{path}: {n} datapoints are too few to split into train, valid and test. Fix: give at "
                            "least 6 datapoints, or save your own split as arrays 'train', 'valid' and 'test'.")
        perm = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(n))  # (N,)
        tensors = {"train": x[perm[:num_train]], "valid": x[perm[num_train:num_train + num_valid]],
                   "test": x[perm[num_train + num_valid:]]}
        rule = (f"perm = numpy.random.default_rng({SPLIT_SEED}).permutation({n}); train = perm[:{num_train}], "
                f"valid = perm[{num_train}:{num_train + num_valid}], test = perm[{num_train + num_valid}:]")
    else:
        rule = "the file's arrays 'train', 'valid' and 'test'"
    provenance = {
        "dataset": "file", "file": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "arrays": {name: list(shape) for name, shape in shapes.items()},
        "domain": domain, **({"num_levels": num_levels} if domain == "levels" else {}),
        "split": {"rule": rule, "seed": SPLIT_SEED, "sizes": {s: int(t.shape[0]) for s, t in tensors.items()}},
    }
    return Dataset(name=f"file:{path.name}", train=tensors["train"], valid=tensors["valid"], test=tensors["test"],
                   image_shape=image_shape, provenance=provenance, num_levels=2 if domain == "binary" else num_levels)
