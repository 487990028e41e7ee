"""MNIST and Fashion-MNIST from their original IDX files: finding them, downloading them, splitting.

Both datasets ship as the same four gzipped IDX files (``FILE_NAMES``). The loader looks for a
directory holding all four, in this order, trying ``DIR/<name>`` before ``DIR`` for the first two:

1. the ``data_dir`` argument (the CLI's ``--data-dir``);
2. ``$GAPBENCH_DATA``;
3. the user cache ``${XDG_CACHE_HOME:-~/.cache}/gapbench/<name>``;
4. system directories (``SYSTEM_DIRS``), e.g. ``/usr/share/datasets/fashion-mnist`` from the Debian
   package ``dataset-fashion-mnist``.

Files found locally are checked by structure (IDX header, counts, image size), not by the MD5 of
the .gz file: Debian re-compresses them, so their gzip bytes differ from upstream while the decoded
arrays do not. If nothing is found and ``download`` is true, the missing files are fetched into the
cache from ``MIRRORS`` and kept only if their MD5 matches ``MD5``.

Split: train = the first 50,000 images of the training file, valid = its last 10,000, test = the
10,000 images of the t10k file. Grey levels 0..255 are divided by 255.

References: LeCun et al. (1998), http://yann.lecun.com/exdb/mnist/; Xiao, Rasul & Vollgraf (2017),
"Fashion-MNIST", arXiv:1708.07747.
"""

import os
from pathlib import Path

import numpy as np
import torch

from gapbench.data.dataset import Dataset, array_record
from gapbench.data.download import cache_dir, fetch_first, make_cache
from gapbench.data.errors import DataError
from gapbench.data.idx import read_idx

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILE_NAMES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

DISPLAY_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
# Canonical sources and the MD5 of their .gz files (the same as torchvision's resources).
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
MD5: dict[str, dict[str, str]] = {
    "mnist": {
        TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        TRAIN_LABELS: "d53e105ee54ea40749a09fcbcd1e9432",
        TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3",
        TEST_LABELS: "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        TRAIN_IMAGES: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        TRAIN_LABELS: "25c81989df183df01b3e8a0aad5dffbe",
        TEST_IMAGES: "bef4ecab320f06d8554ea6380940ec79",
        TEST_LABELS: "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
SYSTEM_DIRS: dict[str, tuple[str, ...]] = {
    "mnist": (),
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),  # Debian: dataset-fashion-mnist
}
NUM_IMAGES = {"train": 60_000, "test": 10_000}  # images in the training and t10k files
NUM_VALID = 10_000  # taken from the end of the training file
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


def search_dirs(name: str, data_dir: str | os.PathLike[str] | None) -> list[tuple[Path, str]]:
    """Directories to look in, in order, each with how it was named (for messages, provenance)."""
    dirs = []
    env_dir = os.environ.get("GAPBENCH_DATA")
    for root, how in ((data_dir, "data_dir / --data-dir"), (env_dir, "$GAPBENCH_DATA")):
        if root:
            root = Path(root).expanduser()
            dirs += [(root / name, how), (root, how)]
    dirs.append((cache_dir(name), "user cache"))
    dirs += [(Path(d), "system directory") for d in SYSTEM_DIRS[name]]
    return dirs


def missing_files(directory: Path) -> list[str]:
    """Which of ``FILE_NAMES`` are not regular files in ``directory``."""
    return [f for f in FILE_NAMES if not (directory / f).is_file()]


def _refuse_incomplete(name: str, dirs: list[tuple[Path, str]], *, download: bool) -> None:
    """Refuse a ``data_dir`` holding some of the dataset's files but not all of them, rather than
    silently loading another copy from elsewhere; DataError naming the missing files."""
    given = [(d, how) for d, how in dirs if how.startswith("data_dir")]
    if not given or any(not missing_files(d) for d, _ in given):
        return
    if any(d.is_dir() and len(missing_files(d)) < len(FILE_NAMES) for d, _ in given):
        note = ("data_dir holds only part of the dataset; gapbench does not fall back to another copy (the cache, "
                "the system directory or a download): remove data.data_dir to use one.")
        switched_off = "Downloading was switched off (download=False)."
        message = _not_found_message(name, dirs, failures=None)
        raise DataError(message.replace(switched_off, f"{switched_off} {note}" if not download else note))


def load_mnist_family(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> Dataset:
    """Find (or download) and load ``"mnist"`` or ``"fashion-mnist"``; see the module docstring.

    Returns
    -------
    Dataset
        ``train`` (50000, 784), ``valid`` (10000, 784), ``test`` (10000, 784) float32 in [0, 1];
        ``image_shape`` (28, 28).

    Raises
    ------
    DataError
        If no directory holds the four files and they cannot be downloaded, a download fails its
        MD5 check, or a file is malformed or has the wrong number or size of images.
    """
    if name not in DISPLAY_NAMES:
        raise DataError(f"unknown dataset {name!r}. Fix: use one of {', '.join(DISPLAY_NAMES)}.")
    dirs = search_dirs(name, data_dir)
    _refuse_incomplete(name, dirs, download=download)
    for directory, how in dirs:
        if not missing_files(directory):
            return _load_dir(name, directory, found_via=how, downloaded_from={})
    if not download:
        raise DataError(_not_found_message(name, dirs, failures=None))
    target = cache_dir(name)
    downloaded_from, failures = _download(name, target)
    if failures:
        raise DataError(_not_found_message(name, dirs, failures))
    return _load_dir(name, target, found_via="download", downloaded_from=downloaded_from)


def _load_dir(
    name: str, directory: Path, *, found_via: str, downloaded_from: dict[str, str]
) -> Dataset:
    """Decode the four files in ``directory``, check their shapes, split and scale to [0, 1]."""
    shapes = {
        TRAIN_IMAGES: (NUM_IMAGES["train"], *IMAGE_SHAPE),
        TRAIN_LABELS: (NUM_IMAGES["train"],),
        TEST_IMAGES: (NUM_IMAGES["test"], *IMAGE_SHAPE),
        TEST_LABELS: (NUM_IMAGES["test"],),
    }
    arrays = {file: _read_checked(name, directory / file, shape) for file, shape in shapes.items()}
    num_train = NUM_IMAGES["train"] - NUM_VALID
    splits = {  # (N, 28, 28) uint8 each
        "train": arrays[TRAIN_IMAGES][:num_train],
        "valid": arrays[TRAIN_IMAGES][num_train:],
        "test": arrays[TEST_IMAGES],
    }

    def to_tensor(x: np.ndarray) -> torch.Tensor:  # (N, 28, 28) uint8 -> (N, 784) float32
        return torch.from_numpy(x.reshape(len(x), -1)).float().div_(255)

    provenance = {
        "dataset": name,
        "source": f"original {DISPLAY_NAMES[name]} IDX files in {directory}",
        "directory": str(directory),
        "found_via": found_via,
        "downloaded_from": downloaded_from,
        "arrays": {file: array_record(array) for file, array in arrays.items()},
        "scale": "grey level / 255",
        "split": {
            "rule": (
                f"train = first {num_train} images of {TRAIN_IMAGES}, "
                f"valid = its last {NUM_VALID}, test = all {NUM_IMAGES['test']} of {TEST_IMAGES}"
            ),
            "seed": None,
            "sizes": {split: len(x) for split, x in splits.items()},
            "sha256": {split: array_record(x)["sha256"] for split, x in splits.items()},
        },
    }
    return Dataset(
        name=name,
        train=to_tensor(splits["train"]),
        valid=to_tensor(splits["valid"]),
        test=to_tensor(splits["test"]),
        image_shape=IMAGE_SHAPE,
        provenance=provenance,
    )


def _read_checked(name: str, path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """read_idx, then check the shape (images ``(N, 28, 28)``, labels ``(N,)``) and labels 0..9."""
    array = read_idx(path, ndim=len(shape))
    fix = (
        f"Fix: this is not the original {path.name} of {DISPLAY_NAMES[name]}; replace it with "
        f"the original (if it is in the gapbench cache, deleting it makes load_dataset fetch it "
        f"again)."
    )
    if array.shape != shape:
        raise DataError(f"{path}: holds an array of shape {array.shape}, expected {shape}. {fix}")
    if array.ndim == 1 and array.max(initial=0) >= NUM_CLASSES:
        raise DataError(f"{path}: has label {array.max()}, expected 0..{NUM_CLASSES - 1}. {fix}")
    return array


def _download(name: str, target: Path) -> tuple[dict[str, str], list[str]]:
    """Fetch the files missing from ``target``, trying each mirror in turn.

    Returns ``(downloaded_from, failures)``: the URL each file came from, and one line per failed
    attempt if some file could not be fetched from any mirror (then it stops).
    """
    problem = make_cache(target)
    if problem:
        return {}, [problem]
    downloaded_from, failures = {}, []
    for file in missing_files(target):
        url, failed = fetch_first([mirror + file for mirror in MIRRORS[name]], target / file, md5=MD5[name][file])
        failures += failed
        if url is None:
            return downloaded_from, failures
        downloaded_from[file] = url
    return downloaded_from, []


def _not_found_message(name: str, dirs: list[tuple[Path, str]], failures: list[str] | None) -> str:
    """What was looked for, where, what the download did, and every way to provide the files."""
    display, cache = DISPLAY_NAMES[name], cache_dir(name)
    lines = [f"{display} files not found. Looked for {', '.join(FILE_NAMES)} in:"]
    for directory, how in dirs:
        missing = missing_files(directory)
        if not directory.is_dir():
            status = "does not exist"
        elif len(missing) == len(FILE_NAMES):
            status = "holds none of them"
        else:
            status = f"missing {', '.join(missing)}"
        lines.append(f"  {directory} ({how}): {status}")
    if failures is None:
        lines.append("Downloading was switched off (download=False).")
    else:
        lines.append(f"Downloading into {cache} failed:")
        lines += [f"  {failure}" for failure in failures]
    lines += [
        "Fix: provide the four files in one of these ways:",
        f"  - pass --data-dir DIR (data_dir=DIR), where DIR or DIR/{name} holds them;",
        f"  - set GAPBENCH_DATA=DIR, where DIR or DIR/{name} holds them;",
        f"  - copy them into the user cache {cache};",
    ]
    if name == "fashion-mnist":
        lines.append("  - install the Debian package: sudo apt-get install dataset-fashion-mnist;")
    lines.append(
        f"  - on a machine with network access, load with download=True to fetch them from "
        f"{' or '.join(MIRRORS[name])} into the cache."
    )
    return "\n".join(lines)
