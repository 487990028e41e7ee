"""CIFAR-10 from its "python version" release: finding it, downloading it, reading it safely, splitting.

The release (https://www.cs.toronto.edu/~kriz/cifar.html; Krizhevsky, 2009, "Learning Multiple
Layers of Features from Tiny Images") is ``cifar-10-python.tar.gz`` (MD5 ``ARCHIVE_MD5``, as
published on that page), holding ``cifar-10-batches-py/`` with the pickled batches
``data_batch_1`` .. ``data_batch_5`` (50,000 training images) and ``test_batch`` (10,000). Each
batch is a dict with ``b"data"``, a uint8 array (N, 3072) whose rows are the red, green and blue
32x32 planes in turn (channels first, rows in order), and ``b"labels"``, N integers 0..9.

The loader looks, in this order, in the ``data_dir`` argument (``--data-dir``), ``$GAPBENCH_DATA``
and the user cache ``${XDG_CACHE_HOME:-~/.cache}/gapbench/cifar10``; in each root R it tries
``R/cifar10/cifar-10-batches-py``, ``R/cifar10``, ``R/cifar-10-batches-py`` and ``R``, and takes the
first folder that holds the six extracted batches or the .tar.gz archive (read in place, nothing
is extracted). Local files are checked by structure, not by MD5, as for MNIST. If nothing is found
and ``download`` is true, the archive is fetched into the cache and kept only if its MD5 matches.

Split: train = the first 45,000 training images (data_batch_1 .. 5 in order), valid = the last
5,000, test = the 10,000 of test_batch. Levels 0..255 are divided by 255; with ``bits < 8`` the
level is first reduced to its ``bits`` high bits (``level >> (8 - bits)``, 2^bits levels, divided by
2^bits - 1), e.g. 3-bit CIFAR.

Why pickle is acceptable here: unpickling can call any importable function, so it is done by
:class:`ArrayUnpickler`, which resolves only the few globals that rebuild numpy arrays (and the
string codec Python 3 pickles use for byte strings), and the result must be exactly the dict of a
batch (a uint8 array and integer labels) or it is refused. A batch file crafted to run code fails
with a DataError naming the global it asked for.
"""

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from gapbench.data.dataset import Dataset, array_record
from gapbench.data.download import cache_dir, fetch_first, make_cache
from gapbench.data.errors import DataError

NAME = "cifar10"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on https://www.cs.toronto.edu/~kriz/cifar.html
URLS: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
BATCH_NAMES: tuple[str, ...] = (*TRAIN_BATCHES, TEST_BATCH)
NUM_IMAGES = {"train": 50_000, "test": 10_000}  # images in the five training batches, in test_batch
NUM_VALID = 5_000  # taken from the end of the training images
IMAGE_SHAPE = (3, 32, 32)  # (C, H, W), the order of a row of b"data"
NUM_CLASSES = 10

_FIX_REPLACE = (f"Fix: replace it with the original from {ARCHIVE}; if it is in the gapbench cache, deleting "
                f"it makes load_dataset download the archive again.")


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a pickled numpy array needs.

    ``encoding="bytes"`` keeps Python 2 strings (the batches were written by Python 2) as bytes, so
    the dict keys are ``b"data"``, ``b"labels"``.
    """

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),  # numpy < 2 and Python 2 pickles
        ("numpy._core.multiarray", "_reconstruct"),  # numpy >= 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # Python 3 protocol-2 pickles spell bytes as encode(str, "latin1")
    })

    def __init__(self, file):
        super().__init__(file, encoding="bytes")

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: a CIFAR-10 batch holds only numpy "
                                         "arrays, numbers and strings")
        if module == "numpy.core.multiarray":  # the numpy >= 2 home of the same function
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def read_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle one batch safely and check its structure.

    Returns
    -------
    images : (N, 3072) uint8
    labels : (N,) int64, values 0..9

    Raises
    ------
    DataError
        If the bytes are not a pickle, ask for any global besides numpy's array reconstruction, or
        are not a dict with a (N, 3072) uint8 ``b"data"`` and N labels 0..9 in ``b"labels"``.
    """
    try:
        batch = ArrayUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as error:
        raise DataError(f"{where}: not a CIFAR-10 batch ({error}). {_FIX_REPLACE}") from None
    except Exception as error:  # noqa: BLE001 (garbage bytes raise EOFError, ValueError, KeyError, ...)
        raise DataError(f"{where}: cannot be unpickled, the file is cut short or corrupt "
                        f"({type(error).__name__}: {error}). {_FIX_REPLACE}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{where}: expected a dict with b'data' and b'labels', got {keys}. {_FIX_REPLACE}")
    images, labels = batch[b"data"], batch[b"labels"]
    size = int(np.prod(IMAGE_SHAPE))
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != size:
        what = f"a {images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"{where}: b'data' is {what}, expected uint8 of shape (N, {size}). {_FIX_REPLACE}")
    if not isinstance(labels, (list, np.ndarray)) or not all(isinstance(v, (int, np.integer)) for v in labels):
        raise DataError(f"{where}: b'labels' is not a list of integers. {_FIX_REPLACE}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (images.shape[0],) or (labels.size and not 0 <= labels.min() <= labels.max() < NUM_CLASSES):
        raise DataError(f"{where}: {labels.size} labels (range {labels.min(initial=0)}..{labels.max(initial=0)}) for "
                        f"{images.shape[0]} images; expected one label 0..{NUM_CLASSES - 1} per image. {_FIX_REPLACE}")
    return images, labels


def search_dirs(data_dir: str | os.PathLike[str] | None) -> list[tuple[Path, str]]:
    """Folders to look in, in order, each with how it was named (for messages and provenance)."""
    roots = [(data_dir, "data_dir / --data-dir"), (os.environ.get("GAPBENCH_DATA"), "$GAPBENCH_DATA")]
    dirs = []
    for root, how in roots:
        if root:
            root = Path(root).expanduser()
            dirs += [(root / NAME / BATCH_DIR, how), (root / NAME, how), (root / BATCH_DIR, how), (root, how)]
    cache = cache_dir(NAME)
    dirs += [(cache / BATCH_DIR, "user cache"), (cache, "user cache")]
    return dirs


def _has_batches(directory: Path) -> bool:
    return all((directory / name).is_file() for name in BATCH_NAMES)


def _read_dir(directory: Path) -> dict[str, bytes]:
    """The six extracted batch files' bytes."""
    raws = {}
    for name in BATCH_NAMES:
        try:
            raws[name] = (directory / name).read_bytes()
        except OSError as error:
            raise DataError(f"{directory / name}: cannot be read ({error}). Fix: check its permissions.") from None
    return raws


def _read_archive(path: Path) -> dict[str, bytes]:
    """The six batches read from the .tar.gz in place (only regular-file members of these names)."""
    try:
        with tarfile.open(path, mode="r:gz") as archive:
            raws = {}
            for name in BATCH_NAMES:
                try:
                    member = archive.getmember(f"{BATCH_DIR}/{name}")
                except KeyError:
                    raise DataError(f"{path}: has no {BATCH_DIR}/{name}; this is not {ARCHIVE}. {_FIX_REPLACE}") from None
                if not member.isfile():
                    raise DataError(f"{path}: {BATCH_DIR}/{name} is not a regular file. {_FIX_REPLACE}")
                raws[name] = archive.extractfile(member).read()
            return raws
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"{path}: the archive is truncated or corrupt ({error}). {_FIX_REPLACE}") from None


def load_cifar10(*, data_dir: str | os.PathLike[str] | None = None, download: bool = True, bits: int = 8) -> Dataset:
    """Find (or download) and load CIFAR-10; see the module docstring.

    Parameters
    ----------
    data_dir : folder searched first (see the module docstring)
    download : fetch the archive into the user cache when nothing is found
    bits : keep the ``bits`` high bits of each 8-bit level (1..8): 2^bits levels in [0, 1]

    Returns
    -------
    Dataset
        ``train`` (45000, 3072), ``valid`` (5000, 3072), ``test`` (10000, 3072) float32 in [0, 1],
        each row the R, G, B planes of a 32x32 image; ``image_shape`` (3, 32, 32);
        ``num_levels`` 2^bits.

    Raises
    ------
    DataError
        If nothing is found and the archive cannot be downloaded, the download fails its MD5
        check, or a batch is malformed or the counts are wrong.
    """
    if not 1 <= bits <= 8:
        raise DataError(f"bits = {bits}; CIFAR-10 has 8-bit levels. Fix: choose bits from 1 to 8.")
    dirs = search_dirs(data_dir)
    given = [d for d, how in dirs if how.startswith("data_dir")]
    if given and not any(_has_batches(d) or (d / ARCHIVE).is_file() for d in given):
        for directory in given:
            missing = [name for name in BATCH_NAMES if not (directory / name).is_file()]
            if directory.is_dir() and len(missing) < len(BATCH_NAMES):
                raise DataError(f"data_dir {directory} holds only part of CIFAR-10: {', '.join(missing)} missing. "
                                f"Fix: put the missing batches there (or {ARCHIVE}), or remove data.data_dir to "
                                "use another copy.")
    for directory, how in dirs:
        if _has_batches(directory):
            return _load(_read_dir(directory), source=str(directory), found_via=how, downloaded_from=None, bits=bits)
        if (directory / ARCHIVE).is_file():
            return _load(_read_archive(directory / ARCHIVE), source=str(directory / ARCHIVE), found_via=how,
                         downloaded_from=None, bits=bits)
    if not download:
        raise DataError(_not_found_message(dirs, failures=None))
    target = cache_dir(NAME)
    url, failures = _download(target)
    if url is None:
        raise DataError(_not_found_message(dirs, failures))
    return _load(_read_archive(target / ARCHIVE), source=str(target / ARCHIVE), found_via="download",
                 downloaded_from=url, bits=bits)


def _load(raws: dict[str, bytes], *, source: str, found_via: str, downloaded_from: str | None,
          bits: int) -> Dataset:
    """Decode the batches, check the counts, split, reduce to ``bits`` and scale to [0, 1]."""
    batches = {name: read_batch(raw, f"{source}: {name}") for name, raw in raws.items()}
    train = np.concatenate([batches[name][0] for name in TRAIN_BATCHES])  # (50000, 3072) uint8
    test = batches[TEST_BATCH][0]  # (10000, 3072)
    for split, images in (("train", train), ("test", test)):
        if len(images) != NUM_IMAGES[split]:
            files = ", ".join(TRAIN_BATCHES) if split == "train" else TEST_BATCH
            raise DataError(f"{source}: {files} hold {len(images)} images, expected {NUM_IMAGES[split]}. {_FIX_REPLACE}")
    num_train = NUM_IMAGES["train"] - NUM_VALID
    splits = {"train": train[:num_train], "valid": train[num_train:], "test": test}
    num_levels = 2**bits

    def to_tensor(x: np.ndarray) -> torch.Tensor:  # (N, 3072) uint8 -> (N, 3072) float32 in [0, 1]
        levels = x >> (8 - bits)  # (N, 3072), 0 .. 2^bits - 1
        return torch.from_numpy(levels).float().div_(num_levels - 1)

    provenance = {
        "dataset": NAME,
        "source": f"CIFAR-10 python version ({ARCHIVE}) in {source}",
        "directory": source,
        "found_via": found_via,
        "downloaded_from": downloaded_from,
        "arrays": {name: array_record(images) for name, (images, _) in batches.items()},
        "layout": "rows of 3072 = R, G, B planes of 32x32 (C, H, W)",
        "bits": bits,
        "scale": "level / 255" if bits == 8 else f"(level >> {8 - bits}) / {num_levels - 1}",
        "split": {
            "rule": (f"train = first {num_train} images of {', '.join(TRAIN_BATCHES)} in order, "
                     f"valid = their last {NUM_VALID}, test = all {NUM_IMAGES['test']} of {TEST_BATCH}"),
            "seed": None,
            "sizes": {split: len(x) for split, x in splits.items()},
            "sha256": {split: array_record(x)["sha256"] for split, x in splits.items()},
        },
    }
    return Dataset(name=NAME, train=to_tensor(splits["train"]), valid=to_tensor(splits["valid"]),
                   test=to_tensor(splits["test"]), image_shape=IMAGE_SHAPE, provenance=provenance,
                   num_levels=num_levels)


def _download(target: Path) -> tuple[str | None, list[str]]:
    """Fetch the archive into ``target`` (MD5-checked, atomic); the URL it came from, or None and
    one line per failed attempt."""
    problem = make_cache(target)
    if problem:
        return None, [problem]
    url, failures = fetch_first(URLS, target / ARCHIVE, md5=ARCHIVE_MD5)
    return url, [] if url else failures


def _not_found_message(dirs: list[tuple[Path, str]], failures: list[str] | None) -> str:
    """What was looked for, where, what the download did, and every way to provide the files."""
    cache = cache_dir(NAME)
    lines = [f"CIFAR-10 not found. Looked for the extracted batches ({', '.join(BATCH_NAMES)}) or {ARCHIVE} in:"]
    for directory, how in dirs:
        status = "does not exist" if not directory.is_dir() else "holds neither"
        lines.append(f"  {directory} ({how}): {status}")
    if failures is None:
        lines.append("Downloading was switched off (download=False).")
    else:
        lines.append(f"Downloading into {cache} failed:")
        lines += [f"  {failure}" for failure in failures]
    lines += [
        f"Fix: provide {ARCHIVE} (MD5 {ARCHIVE_MD5}) or its extracted {BATCH_DIR} folder in one of these ways:",
        f"  - pass --data-dir DIR (data_dir=DIR), where DIR, DIR/{NAME} or DIR/{BATCH_DIR} holds it;",
        "  - set GAPBENCH_DATA=DIR, likewise;",
        f"  - copy it into the user cache {cache};",
        f"  - on a machine with network access, load with download=True to fetch it from {' or '.join(URLS)}.",
    ]
    return "\n".join(lines)


__all__ = ["ARCHIVE", "ARCHIVE_MD5", "ArrayUnpickler", "load_cifar10", "read_batch"]
