"""Datasets (digits, Fashion-MNIST, MNIST, CIFAR-10) with fixed splits and provenance, and binarisation.

The lowest layer of gapbench: it imports nothing from the rest of the package.
"""

from gapbench.data.binarize import BINARIZE_MODES, binarize
from gapbench.data.dataset import (DATASETS, SPLITS, Dataset, check_binary, check_finite, check_levels, check_values,
    load_dataset)
from gapbench.data.errors import DataError
from gapbench.data.idx import read_idx, write_idx

__all__ = [
    "BINARIZE_MODES",
    "DATASETS",
    "SPLITS",
    "DataError",
    "Dataset",
    "binarize",
    "check_binary",
    "check_finite",
    "check_levels",
    "check_values",
    "load_dataset",
    "read_idx",
    "write_idx",
]
