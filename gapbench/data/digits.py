"""scikit-learn's bundled 8x8 handwritten digits: the offline default dataset."""

import numpy as np
import sklearn
import sklearn.datasets
import torch

from gapbench.data.dataset import Dataset, array_record
from gapbench.data.errors import DataError

SPLIT_SEED = 0
NUM_TRAIN, NUM_VALID, NUM_TEST = 1197, 300, 300  # 1797 images in all
MAX_LEVEL = 16  # the digits have grey levels 0..16


def load_digits() -> Dataset:
    """The 1797 digits as 1197 train / 300 valid / 300 test images of 64 pixels in [0, 1].

    The split is fixed, independent of any run seed:
    ``perm = numpy.random.default_rng(0).permutation(1797)``, then train = ``perm[:1197]``,
    valid = ``perm[1197:1497]``, test = ``perm[1497:]``. Grey levels 0..16 are divided by 16.
    Data: Alpaydin & Kaynak (1998), UCI "Optical Recognition of Handwritten Digits".

    Returns
    -------
    Dataset
        ``train`` (1197, 64), ``valid`` (300, 64), ``test`` (300, 64); ``image_shape`` (8, 8).
    """
    images = sklearn.datasets.load_digits().images  # (1797, 8, 8) float64, integers 0..16
    levels = images.astype(np.uint8)
    num_images = NUM_TRAIN + NUM_VALID + NUM_TEST
    if images.shape != (num_images, 8, 8) or not np.array_equal(levels, images):
        raise DataError(
            f"scikit-learn {sklearn.__version__} returned digits of shape {images.shape} that are "
            f"not integers 0..16; expected (1797, 8, 8). Fix: reinstall scikit-learn."
        )
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(levels))  # (1797,)
    bounds = {
        "train": (0, NUM_TRAIN),
        "valid": (NUM_TRAIN, NUM_TRAIN + NUM_VALID),
        "test": (NUM_TRAIN + NUM_VALID, len(levels)),
    }
    splits = {split: levels[perm[start:stop]] for split, (start, stop) in bounds.items()}

    def to_tensor(x: np.ndarray) -> torch.Tensor:  # (N, 8, 8) uint8 -> (N, 64) float32
        return torch.from_numpy(x.reshape(len(x), -1)).float().div_(MAX_LEVEL)

    provenance = {
        "dataset": "digits",
        "source": f"scikit-learn {sklearn.__version__} (sklearn.datasets.load_digits)",
        "arrays": {"images": array_record(levels)},
        "scale": f"grey level / {MAX_LEVEL}",
        "split": {
            "rule": (
                f"perm = numpy.random.default_rng({SPLIT_SEED}).permutation(1797); "
                f"train = perm[:{NUM_TRAIN}], valid = perm[{NUM_TRAIN}:{NUM_TRAIN + NUM_VALID}], "
                f"test = perm[{NUM_TRAIN + NUM_VALID}:]"
            ),
            "seed": SPLIT_SEED,
            "sizes": {split: len(x) for split, x in splits.items()},
            "sha256": {split: array_record(x)["sha256"] for split, x in splits.items()},
        },
    }
    return Dataset(
        name="digits",
        train=to_tensor(splits["train"]),
        valid=to_tensor(splits["valid"]),
        test=to_tensor(splits["test"]),
        image_shape=(8, 8),
        provenance=provenance,
        num_levels=MAX_LEVEL + 1,
    )
