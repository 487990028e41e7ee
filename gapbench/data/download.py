"""Downloads of the dataset files that are not found locally: the user cache, an atomic MD5-checked
fetch, and trying the sources of one file in turn (shared by MNIST, Fashion-MNIST and CIFAR-10)."""

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

from gapbench.data.errors import DataError

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 30.0


def cache_dir(name: str) -> Path:
    """The user cache for dataset ``name``: ``${XDG_CACHE_HOME:-~/.cache}/gapbench/<name>``."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root).expanduser() / "gapbench" / name


class ChecksumError(DataError, ValueError):
    """A downloaded file's MD5 is not the published one."""


def fetch(url: str, dest: Path, *, md5: str) -> None:
    """Download ``url`` to ``dest`` atomically, keeping it only if its MD5 is ``md5``.

    The bytes go to a temporary file beside ``dest`` that is renamed onto ``dest`` only when
    complete and verified, and removed otherwise, so no partial file is ever left.
    """
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
        ):
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != md5:
            raise ChecksumError(
                f"MD5 mismatch for {dest.name}: expected {md5}, got {digest.hexdigest()}; "
                f"the download was discarded (the server, a proxy or a captive portal sent a "
                f"different file: retry later, or fetch the file yourself and verify its MD5)"
            )
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_cache(target: Path) -> str | None:
    """Create the cache folder ``target`` (and its parents); None, or the line saying why it cannot be."""
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot create the cache directory {target}: {error}"
    return None


def fetch_first(urls: tuple[str, ...] | list[str], dest: Path, *, md5: str) -> tuple[str | None, list[str]]:
    """:func:`fetch` ``dest`` from the first of ``urls`` that serves it with MD5 ``md5``.

    Returns ``(url, failures)``: the URL the file came from (None if none did), and one line
    ``"URL: why"`` per failed attempt (an unreachable server, an HTTP error, a checksum mismatch).
    """
    failures = []
    for url in urls:
        logger.info("downloading %s", url)
        try:
            fetch(url, dest, md5=md5)
        except (OSError, http.client.HTTPException, ValueError) as error:  # incl. URLError, ChecksumError
            failures.append(f"{url}: {error}")
            continue
        return url, failures
    return None, failures


__all__ = ["DOWNLOAD_TIMEOUT_S", "ChecksumError", "cache_dir", "fetch", "fetch_first", "make_cache"]
