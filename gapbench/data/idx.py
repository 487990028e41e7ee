"""Reading and writing IDX files, the format of the original MNIST and Fashion-MNIST releases.

An IDX file is a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32
dimensions, then the values in C order. Only unsigned bytes (type ``0x08``) are used by these
datasets, so only they are supported: images are ``0x00000803`` (N, rows, cols) and labels
``0x00000801`` (N,). See http://yann.lecun.com/exdb/mnist/ ("FILE FORMATS").
"""

import gzip
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from gapbench.data.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_UNSIGNED_BYTE = 0x08

_FIX_REPLACE = (
    "Fix: replace it with the original file from the dataset's release; if it is in the gapbench "
    "cache, deleting it makes load_dataset download it again."
)


def read_idx(path: str | os.PathLike[str], *, ndim: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file, gzipped or not, and check its structure.

    Gzip is recognised by its magic bytes, whatever the file is called.

    Parameters
    ----------
    path : str or os.PathLike
        The file, e.g. ``train-images-idx3-ubyte.gz``.
    ndim : int, optional
        Required number of dimensions (3 for images, 1 for labels); any if omitted.

    Returns
    -------
    numpy.ndarray
        uint8 array of the shape declared in the header, e.g. ``(60000, 28, 28)``.

    Raises
    ------
    DataError
        If the file is missing or unreadable, the gzip stream is truncated or corrupt, the magic
        number is wrong, or the payload length does not match the declared dimensions.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        message = f"{path}: no such file. Fix: check the path, or put the file there."
        raise DataError(message) from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error}). Fix: check its permissions.") from None

    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(
                f"{path}: the gzip stream is truncated or corrupt ({error}). {_FIX_REPLACE}"
            ) from None

    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header. {_FIX_REPLACE}")
    num_dims = raw[3]
    is_ubyte = raw[:3] == bytes([0, 0, _UNSIGNED_BYTE]) and num_dims > 0
    if not is_ubyte or (ndim is not None and num_dims != ndim):
        if ndim is None:
            wanted = "0x000008NN (unsigned-byte IDX)"
        else:
            wanted = f"0x{_UNSIGNED_BYTE << 8 | ndim:08x} (unsigned-byte IDX, {ndim}-D)"
        raise DataError(
            f"{path}: wrong IDX magic number 0x{raw[:4].hex()}, expected {wanted}; this is not "
            f"the expected IDX file. {_FIX_REPLACE}"
        )

    header_len = 4 + 4 * num_dims
    if len(raw) < header_len:
        raise DataError(f"{path}: the IDX header is cut short. {_FIX_REPLACE}")
    shape = struct.unpack(f">{num_dims}I", raw[4:header_len])
    expected_len = math.prod(shape)
    payload_len = len(raw) - header_len
    if payload_len != expected_len:
        raise DataError(
            f"{path}: wrong payload length: the header declares dimensions {shape}, which need "
            f"{expected_len} bytes, but the file holds {payload_len}. {_FIX_REPLACE}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file; gzipped (reproducibly, mtime 0) if the name ends in .gz.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    array : numpy.ndarray
        uint8 array with 1 to 255 dimensions, e.g. images ``(N, 28, 28)`` or labels ``(N,)``.

    Raises
    ------
    ValueError
        If ``array`` is not uint8 or has no dimensions.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx writes uint8 arrays only, got {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"write_idx needs 1 to 255 dimensions, got {array.ndim}")
    magic = bytes([0, 0, _UNSIGNED_BYTE, array.ndim])
    header = magic + struct.pack(f">{array.ndim}I", *array.shape)  # big-endian uint32 dims
    data = header + np.ascontiguousarray(array).tobytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    path = Path(path)  # written to a temporary name and renamed, so never seen half-written
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
