"""Datasets (digits, Fashion-MNIST, MNIST, CIFAR-10, a user's array file) with fixed splits and
provenance, and binarisation.

It imports only ``gapbench.errors`` from the rest of the package. Inside it, imports point one way:
``errors`` <- ``dataset``, ``idx``, ``download`` <- the loaders (``digits``, ``mnist``, ``cifar10``,
``userfile``) <- ``load`` (``load_dataset`` by name).
"""

from gapbench.data.binarize import BINARIZE_MODES, binarize
from gapbench.data.dataset import SPLITS, Dataset, check_binary, check_finite, check_levels, check_values
from gapbench.data.download import ChecksumError
from gapbench.data.errors import DataError
from gapbench.data.idx import read_idx, write_idx
from gapbench.data.load import DATASETS, load_dataset

__all__ = [
    "BINARIZE_MODES",
    "DATASETS",
    "SPLITS",
    "ChecksumError",
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
