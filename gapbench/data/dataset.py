"""The Dataset container (three fixed splits with their provenance) and the checks of its values."""

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from gapbench.data.errors import DataError

SPLITS: tuple[str, ...] = ("train", "valid", "test")


def check_values(x: torch.Tensor, name: str) -> None:
    """Check that ``x`` holds finite grey levels in [0, 1].

    Parameters
    ----------
    x : torch.Tensor
        Any shape, e.g. ``(N, D)``.
    name : str
        What ``x`` is, for the message, e.g. ``"mnist train split"``.

    Raises
    ------
    DataError
        If ``x`` has NaN or infinite values, or values outside [0, 1].
    """
    if x.numel() == 0:
        return
    low, high = torch.aminmax(x)  # NaN propagates, so one pass catches NaN, inf and range
    if low >= 0 and high <= 1:
        return
    num_bad = int((~torch.isfinite(x)).sum())
    if num_bad:
        raise DataError(
            f"{name}: {num_bad} of {x.numel()} values are NaN or infinite. Fix: the data are "
            f"corrupt or were transformed wrongly; reload them from the original files."
        )
    raise DataError(
        f"{name}: values span [{float(low):g}, {float(high):g}], outside [0, 1]. "
        f"Fix: scale grey levels to [0, 1] (divide 8-bit pixels by 255)."
    )


def check_finite(x: torch.Tensor, name: str) -> None:
    """Check that ``x`` (any shape) holds no NaN or infinite value; DataError naming ``name`` if it does."""
    num_bad = int((~torch.isfinite(x)).sum()) if x.is_floating_point() else 0
    if num_bad:
        raise DataError(
            f"{name}: {num_bad} of {x.numel()} values are NaN or infinite. Fix: the data are "
            f"corrupt or were transformed wrongly; reload them from the original files."
        )


def check_binary(x: torch.Tensor, name: str) -> None:
    """Check that ``x`` (any shape) holds only 0 and 1, what a Bernoulli likelihood is a density of.

    Raises
    ------
    DataError
        If ``x`` has NaN, infinite or any value other than 0 and 1.
    """
    check_finite(x, name)
    num_bad = int(((x != 0) & (x != 1)).sum())
    if num_bad:
        raise DataError(
            f"{name}: {num_bad} of {x.numel()} values are neither 0 nor 1, but the Bernoulli "
            f"likelihood is a density of binary data only. Fix: binarise grey levels in [0, 1] "
            f"first (gapbench.data.binarize, mode 'static' or 'dynamic')."
        )


def check_levels(x: torch.Tensor, num_levels: int, name: str) -> None:
    """Check that ``x`` (any shape) holds only the levels k / (L - 1), k = 0..L-1, with L = ``num_levels``:
    what a discretised likelihood over L levels is a distribution of (float32 rounding tolerated).

    Raises
    ------
    DataError
        If ``x`` has NaN, infinite, out-of-range or in-between values.
    """
    check_finite(x, name)
    check_values(x, name)
    scaled = x * (num_levels - 1)  # (..) should be integers 0..L-1
    num_bad = int(((scaled - scaled.round()).abs() > 1e-3).sum())
    if num_bad:
        raise DataError(
            f"{name}: {num_bad} of {x.numel()} values are not among the {num_levels} levels k / {num_levels - 1} "
            f"that the discretised likelihood is a distribution of. Fix: pass the dataset's pixel levels "
            f"unchanged (no binarisation, no rescaling)."
        )


def array_record(array: np.ndarray) -> dict:
    """Shape and sha256 of the raw bytes of a decoded uint8 array, for provenance."""
    return {
        "shape": list(array.shape),
        "sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(),
    }


@dataclass(frozen=True, eq=False)
class Dataset:
    """Three fixed splits of flattened grey-level images, with where they came from.

    Construction checks shapes, dtype and values, so every Dataset is valid.
    """

    name: str  # "digits" | "fashion-mnist" | "mnist" | "cifar10"
    train: torch.Tensor  # (N_train, D) float32 grey levels in [0, 1]
    valid: torch.Tensor  # (N_valid, D)
    test: torch.Tensor  # (N_test, D)
    image_shape: tuple[int, ...]  # (H, W) or (C, H, W), product D: (8, 8), (28, 28) or (3, 32, 32)
    provenance: dict  # JSON-serialisable: sources, sha256 of decoded uint8 arrays, split rule/sizes
    num_levels: int = 256  # L: values are k / (L - 1), k = 0..L-1 (digits: 17; CIFAR-10 with b bits: 2^b)

    def __post_init__(self) -> None:
        size = math.prod(self.image_shape)
        for split in SPLITS:
            x = getattr(self, split)
            what = f"{self.name} {split} split"
            if x.dtype != torch.float32 or x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != size:
                raise DataError(
                    f"{what}: got a {x.dtype} tensor of shape {tuple(x.shape)}; a Dataset needs "
                    f"float32 of shape (N > 0, {size}) for images of shape {self.image_shape}. "
                    f"Fix: flatten the images and convert them with .float()."
                )
            check_values(x, what)
        try:
            json.dumps(self.provenance)
        except TypeError as error:
            raise TypeError(f"Dataset provenance must be JSON-serialisable: {error}") from None

    @property
    def channels_first_shape(self) -> tuple[int, int, int]:
        """``image_shape`` as (C, H, W); grey-level images have C = 1."""
        return tuple(self.image_shape) if len(self.image_shape) == 3 else (1, *self.image_shape)  # type: ignore[return-value]

    def split(self, name: str) -> torch.Tensor:
        """The ``(N, D)`` tensor of split ``name``: ``"train"``, ``"valid"`` or ``"test"``."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}. Fix: use one of {', '.join(SPLITS)}.")
        return getattr(self, name)

    @property
    def data_size(self) -> int:
        """D, the number of pixels per image."""
        return self.train.shape[1]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={tuple(getattr(self, s).shape)}" for s in SPLITS)
        return f"Dataset(name={self.name!r}, {sizes}, image_shape={self.image_shape})"
