"""Atomic file writes: write to a temporary name in the same folder, flush it to disk, then rename.

A reader (or a resumed run) sees either the old file or the complete new one, never half a file,
even if the process is killed mid-write (SIGKILL included). A kill leaves at most a temporary file
``.<name>.<random>.tmp``, which the run folder removes when it is next opened.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as written:  # the bytes reach the disk before the name does
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    with _atomic_path(Path(path)) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    with _atomic_path(Path(path)) as tmp:
        frame.to_csv(tmp, index=False)  # shortest repr: floats read back exactly


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read a CSV written by :func:`write_csv`, every float exactly as written."""
    # pandas 3 parses floats exactly by default; pandas 2 needs to be asked
    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    return pd.read_csv(path, **exact)


def save_torch(path: str | Path, obj: Any) -> None:
    """``torch.save`` atomically; a failed write (a full disk: torch raises RuntimeError
    "[enforce fail at inline_container.cc] ... file write failed") is an OSError naming ``path``."""
    try:
        with _atomic_path(Path(path)) as tmp, open(tmp, "wb") as file:
            torch.save(obj, file)  # to a file object: the archive is named "archive", not after tmp
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        raise OSError(errno.EIO, f"writing the torch file failed ({lines[0] if lines else error}); is the disk full?",
                      str(path)) from None

