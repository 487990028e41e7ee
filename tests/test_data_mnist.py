"""Tests for the MNIST-family loader: search order, splits, checks and downloads, on tiny files."""

import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import gapbench.data.download as download
import gapbench.data.mnist as mnist
from gapbench.data import DataError, load_dataset, write_idx

NUM_TRAIN, NUM_TEST, NUM_VALID = 12, 5, 4  # stand-ins for 60000, 10000, 10000


@pytest.fixture(autouse=True)
def small_and_isolated(monkeypatch, tmp_path):
    """Tiny expected counts, no system directories, an empty cache, no $GAPBENCH_DATA."""
    monkeypatch.setattr(mnist, "NUM_IMAGES", {"train": NUM_TRAIN, "test": NUM_TEST})
    monkeypatch.setattr(mnist, "NUM_VALID", NUM_VALID)
    monkeypatch.setattr(mnist, "SYSTEM_DIRS", {"mnist": (), "fashion-mnist": ()})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("GAPBENCH_DATA", raising=False)


def write_fake(directory: Path, *, seed: int, num_train: int = NUM_TRAIN) -> dict[str, np.ndarray]:
    """Write the four IDX .gz files with random content into ``directory``; return the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        mnist.TRAIN_IMAGES: rng.integers(0, 256, size=(num_train, 28, 28), dtype=np.uint8),
        mnist.TRAIN_LABELS: rng.integers(0, 10, size=num_train, dtype=np.uint8),
        mnist.TEST_IMAGES: rng.integers(0, 256, size=(NUM_TEST, 28, 28), dtype=np.uint8),
        mnist.TEST_LABELS: rng.integers(0, 10, size=NUM_TEST, dtype=np.uint8),
    }
    arrays[mnist.TRAIN_IMAGES][0, 0, :2] = (0, 255)  # both ends of the grey scale occur
    directory.mkdir(parents=True, exist_ok=True)
    for file, array in arrays.items():
        write_idx(directory / file, array)
    return arrays


def flat(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 784) float32 in [0, 1]."""
    return torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255)


def md5s(directory: Path) -> dict[str, str]:
    return {f: hashlib.md5((directory / f).read_bytes()).hexdigest() for f in mnist.FILE_NAMES}


def test_split_and_scaling(tmp_path):
    arrays = write_fake(tmp_path / "d", seed=0)
    data = load_dataset("mnist", data_dir=tmp_path / "d", download=False)
    images = arrays[mnist.TRAIN_IMAGES]
    assert data.name == "mnist" and data.image_shape == (28, 28) and data.data_size == 784
    assert torch.equal(data.train, flat(images[: NUM_TRAIN - NUM_VALID]))  # first N - 10000
    assert torch.equal(data.valid, flat(images[NUM_TRAIN - NUM_VALID :]))  # last 10000
    assert torch.equal(data.test, flat(arrays[mnist.TEST_IMAGES]))
    assert data.train.min() == 0 and data.train.max() == 1
    provenance = json.loads(json.dumps(data.provenance))
    assert provenance["directory"] == str(tmp_path / "d")
    assert provenance["found_via"] == "data_dir / --data-dir"
    assert provenance["split"]["sizes"] == {"train": 8, "valid": 4, "test": NUM_TEST}
    sha = hashlib.sha256(images.tobytes()).hexdigest()
    assert provenance["arrays"][mnist.TRAIN_IMAGES] == {"shape": [NUM_TRAIN, 28, 28], "sha256": sha}


def test_name_subdirectory_is_accepted_and_preferred(tmp_path):
    inner = write_fake(tmp_path / "root" / "fashion-mnist", seed=1)
    data = load_dataset("fashion-mnist", data_dir=tmp_path / "root", download=False)
    assert torch.equal(data.test, flat(inner[mnist.TEST_IMAGES]))
    write_fake(tmp_path / "root", seed=2)  # DIR itself now holds files too: DIR/<name> still wins
    data = load_dataset("fashion-mnist", data_dir=tmp_path / "root", download=False)
    assert torch.equal(data.test, flat(inner[mnist.TEST_IMAGES]))


def test_search_order(tmp_path, monkeypatch):
    given = write_fake(tmp_path / "given", seed=1)
    env = write_fake(tmp_path / "env", seed=2)
    cached = write_fake(tmp_path / "cache" / "gapbench" / "mnist", seed=3)
    monkeypatch.setenv("GAPBENCH_DATA", str(tmp_path / "env"))

    def test_images(**kwargs) -> torch.Tensor:
        return load_dataset("mnist", download=False, **kwargs).test

    assert torch.equal(test_images(data_dir=tmp_path / "given"), flat(given[mnist.TEST_IMAGES]))
    assert torch.equal(test_images(), flat(env[mnist.TEST_IMAGES]))
    assert torch.equal(test_images(data_dir=tmp_path / "empty"), flat(env[mnist.TEST_IMAGES]))
    monkeypatch.delenv("GAPBENCH_DATA")
    data = load_dataset("mnist", download=False)
    assert torch.equal(data.test, flat(cached[mnist.TEST_IMAGES]))
    assert data.provenance["found_via"] == "user cache"


def test_system_directory_comes_last(tmp_path, monkeypatch):
    system = write_fake(tmp_path / "system", seed=1)
    monkeypatch.setitem(mnist.SYSTEM_DIRS, "fashion-mnist", (str(tmp_path / "system"),))
    data = load_dataset("fashion-mnist", download=False)
    assert torch.equal(data.test, flat(system[mnist.TEST_IMAGES]))
    assert data.provenance["found_via"] == "system directory"
    cached = write_fake(tmp_path / "cache" / "gapbench" / "fashion-mnist", seed=2)
    data = load_dataset("fashion-mnist", download=False)
    assert torch.equal(data.test, flat(cached[mnist.TEST_IMAGES]))


def test_not_found_message_lists_everything(tmp_path, monkeypatch):
    write_fake(tmp_path / "partial", seed=0)
    (tmp_path / "partial" / mnist.TEST_LABELS).unlink()
    monkeypatch.setenv("GAPBENCH_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as caught:
        load_dataset("fashion-mnist", data_dir=tmp_path / "partial", download=False)
    message = str(caught.value)
    for file in mnist.FILE_NAMES:
        assert file in message
    assert f"{tmp_path / 'partial'} (data_dir / --data-dir): missing {mnist.TEST_LABELS}" in message
    subdir = tmp_path / "partial" / "fashion-mnist"
    assert f"{subdir} (data_dir / --data-dir): does not exist" in message
    assert f"{tmp_path / 'env'} ($GAPBENCH_DATA): does not exist" in message
    assert f"{tmp_path / 'cache' / 'gapbench' / 'fashion-mnist'} (user cache)" in message
    assert "download=False" in message
    for fix in ("--data-dir DIR", "GAPBENCH_DATA=DIR", "apt-get install dataset-fashion-mnist"):
        assert fix in message
    with pytest.raises(DataError) as caught:
        load_dataset("mnist", download=False)
    assert "apt-get" not in str(caught.value)


@pytest.mark.parametrize(
    ("file", "shape", "pattern"),
    [
        (mnist.TRAIN_IMAGES, (NUM_TRAIN + 1, 28, 28), r"\(13, 28, 28\), expected \(12, 28, 28\)"),
        (mnist.TEST_IMAGES, (NUM_TEST, 28, 27), r"shape \(5, 28, 27\), expected \(5, 28, 28\)"),
        (mnist.TRAIN_LABELS, (NUM_TRAIN - 1,), r"shape \(11,\), expected \(12,\)"),
        (mnist.TEST_LABELS, (NUM_TEST, 1), r"IDX magic number 0x00000802, expected 0x00000801"),
    ],
)
def test_wrong_shapes_are_rejected(tmp_path, file, shape, pattern):
    write_fake(tmp_path, seed=0)
    write_idx(tmp_path / file, np.zeros(shape, dtype=np.uint8))
    with pytest.raises(DataError, match=f"{file}: .*{pattern}.*Fix"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_bad_label_value_is_rejected(tmp_path):
    write_fake(tmp_path, seed=0)
    write_idx(tmp_path / mnist.TEST_LABELS, np.full(NUM_TEST, 10, dtype=np.uint8))
    with pytest.raises(DataError, match=f"{mnist.TEST_LABELS}: has label 10, expected 0..9"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


# --- downloads ----------------------------------------------------------------------------------


def cache(name: str, tmp_path: Path) -> Path:
    return tmp_path / "cache" / "gapbench" / name


def test_download_from_file_url(tmp_path, monkeypatch):
    source = write_fake(tmp_path / "server", seed=5)
    monkeypatch.setitem(mnist.MIRRORS, "fashion-mnist", ((tmp_path / "server").as_uri() + "/",))
    monkeypatch.setitem(mnist.MD5, "fashion-mnist", md5s(tmp_path / "server"))
    data = load_dataset("fashion-mnist")
    target = cache("fashion-mnist", tmp_path)
    assert sorted(p.name for p in target.iterdir()) == sorted(mnist.FILE_NAMES)  # no temp files
    assert md5s(target) == md5s(tmp_path / "server")
    assert torch.equal(data.test, flat(source[mnist.TEST_IMAGES]))
    assert data.provenance["found_via"] == "download"
    url = data.provenance["downloaded_from"][mnist.TRAIN_IMAGES]
    assert url == (tmp_path / "server" / mnist.TRAIN_IMAGES).as_uri()
    # The next load finds the cache and does not download.
    monkeypatch.setitem(mnist.MIRRORS, "fashion-mnist", ("http://127.0.0.1:9/",))
    assert load_dataset("fashion-mnist").provenance["found_via"] == "user cache"


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server in a thread serving ``tmp_path / "http"``; yields its base URL."""
    root = tmp_path / "http"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_over_http_falls_back_to_next_mirror(tmp_path, monkeypatch, http_root):
    source = write_fake(tmp_path / "http" / "good", seed=6)
    write_fake(cache("mnist", tmp_path), seed=7)
    for file in (mnist.TEST_IMAGES, mnist.TEST_LABELS):  # a partial cache: only these are fetched
        (cache("mnist", tmp_path) / file).unlink()
    monkeypatch.setitem(mnist.MIRRORS, "mnist", (http_root + "absent/", http_root + "good/"))
    monkeypatch.setitem(mnist.MD5, "mnist", md5s(tmp_path / "http" / "good"))
    data = load_dataset("mnist")
    assert data.provenance["downloaded_from"] == {
        mnist.TEST_IMAGES: http_root + "good/" + mnist.TEST_IMAGES,
        mnist.TEST_LABELS: http_root + "good/" + mnist.TEST_LABELS,
    }
    assert torch.equal(data.test, flat(source[mnist.TEST_IMAGES]))


def test_checksum_mismatch_keeps_nothing(tmp_path, monkeypatch, http_root):
    write_fake(tmp_path / "http", seed=8)
    expected = md5s(tmp_path / "http")
    actual = expected[mnist.TRAIN_IMAGES]
    wrong = "0" * 32
    monkeypatch.setitem(mnist.MIRRORS, "mnist", (http_root,))
    monkeypatch.setitem(mnist.MD5, "mnist", {**expected, mnist.TRAIN_IMAGES: wrong})
    with pytest.raises(DataError) as caught:
        load_dataset("mnist")
    message = str(caught.value)
    assert f"MD5 mismatch for {mnist.TRAIN_IMAGES}: expected {wrong}, got {actual}" in message
    assert "discarded" in message and "Fix:" in message
    assert list(cache("mnist", tmp_path).iterdir()) == []  # no file, no temporary file


def test_unreachable_mirror(tmp_path, monkeypatch):
    monkeypatch.setitem(mnist.MIRRORS, "mnist", ("http://127.0.0.1:9/",))
    with pytest.raises(DataError) as caught:
        load_dataset("mnist", data_dir=tmp_path / "given")
    message = str(caught.value)
    assert f"{tmp_path / 'given'} (data_dir / --data-dir): does not exist" in message
    assert f"{cache('mnist', tmp_path)} (user cache)" in message
    assert f"Downloading into {cache('mnist', tmp_path)} failed" in message
    assert f"http://127.0.0.1:9/{mnist.TRAIN_IMAGES}: " in message
    assert list(cache("mnist", tmp_path).iterdir()) == []


def test_interrupted_download_leaves_no_file(tmp_path, monkeypatch):
    class Broken:
        """A response that sends one chunk and then loses the connection."""

        def __init__(self) -> None:
            self.chunks = [b"\x1f\x8b partial"]

        def read(self, size: int) -> bytes:
            if self.chunks:
                return self.chunks.pop()
            raise ConnectionResetError("connection lost")

        def __enter__(self) -> "Broken":
            return self

        def __exit__(self, *args) -> None:
            pass

    monkeypatch.setattr(download.urllib.request, "urlopen", lambda url, timeout: Broken())
    with pytest.raises(DataError, match="connection lost"):
        load_dataset("mnist")
    assert list(cache("mnist", tmp_path).iterdir()) == []
