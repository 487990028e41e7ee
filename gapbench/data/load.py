"""``load_dataset``: a dataset by name, from the loader of its source."""

import os

from gapbench.data.cifar10 import load_cifar10
from gapbench.data.dataset import Dataset
from gapbench.data.digits import load_digits
from gapbench.data.errors import DataError
from gapbench.data.mnist import load_mnist_family
from gapbench.data.userfile import load_file_dataset

DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "mnist", "cifar10", "file")


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    bits: int = 8,
    file: str | os.PathLike[str] | None = None,
    domain: str | None = None,
    num_levels: int | None = None,
) -> Dataset:
    """Load a dataset by name with its fixed train/valid/test split.

    Parameters
    ----------
    name : str
        One of ``DATASETS``: ``"digits"`` (scikit-learn's bundled 8x8 digits, offline),
        ``"fashion-mnist"`` or ``"mnist"`` (original IDX files, see ``gapbench.data.mnist``),
        ``"cifar10"`` (the python-version pickles, see ``gapbench.data.cifar10``).
    data_dir : str or os.PathLike, optional
        Directory searched first for the files (itself and ``data_dir/<name>``).
        Unused for ``"digits"``.
    download : bool
        Whether to download missing files into the user cache. Unused for ``"digits"``.
    bits : int
        ``"cifar10"`` only: keep the high ``bits`` of each 8-bit level (2^bits levels); the other
        datasets refuse anything but 8.
    file, domain, num_levels : str or os.PathLike, str, int
        ``"file"`` only: the user's array file, its values' domain (``"binary"`` or ``"levels"``,
        default ``"levels"``) and L (default 256); see ``gapbench.data.userfile``.

    Returns
    -------
    Dataset

    Raises
    ------
    DataError
        If the name is unknown, or the files cannot be found, fetched or read.
    """
    if name == "file":
        if file is None:
            raise DataError("dataset 'file' needs the path of the array file. Fix: give data.file.")
        return load_file_dataset(file, domain=domain or "levels", num_levels=num_levels or 256)

    if bits != 8 and name != "cifar10":
        raise DataError(f"bits = {bits} applies to cifar10 only. Fix: leave bits at 8 for {name!r}.")
    if name == "cifar10":
        return load_cifar10(data_dir=data_dir, download=download, bits=bits)
    if name == "digits":
        return load_digits()
    if name in ("fashion-mnist", "mnist"):
        return load_mnist_family(name, data_dir=data_dir, download=download)
    raise DataError(f"unknown dataset {name!r}. Fix: use one of {', '.join(DATASETS)}.")
