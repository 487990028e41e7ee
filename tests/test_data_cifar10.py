"""Tests for the CIFAR-10 loader: search order, archive or folder, split, bits, safe unpickling and
downloads (file:// URLs and MD5 checks), on tiny pickles written here."""

import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gapbench.data import DataError, cifar10, load_dataset

PER_BATCH, NUM_TEST, NUM_VALID = 3, 4, 5  # stand-ins for 10000 per batch, 10000, 5000
SIZE = 3 * 32 * 32


@pytest.fixture(autouse=True)
def small_and_isolated(monkeypatch, tmp_path):
    """Tiny expected counts, an empty cache, no $GAPBENCH_DATA."""
    monkeypatch.setattr(cifar10, "NUM_IMAGES", {"train": 5 * PER_BATCH, "test": NUM_TEST})
    monkeypatch.setattr(cifar10, "NUM_VALID", NUM_VALID)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("GAPBENCH_DATA", raising=False)


def batch_bytes(images: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled as the release has it: bytes keys, a uint8 (N, 3072) array, a list of labels."""
    batch = {b"batch_label": b"fake batch", b"labels": labels, b"data": images,
             b"filenames": [b"x.png"] * len(labels)}
    return pickle.dumps(batch, protocol=2)


def fake_batches(seed: int) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(seed)
    batches = {}
    for name in cifar10.BATCH_NAMES:
        n = NUM_TEST if name == cifar10.TEST_BATCH else PER_BATCH
        batches[name] = (rng.integers(0, 256, size=(n, SIZE), dtype=np.uint8), rng.integers(0, 10, n).tolist())
    batches["data_batch_1"][0][0, :2] = (0, 255)  # both ends of the scale occur
    return batches


def write_folder(directory: Path, *, seed: int) -> dict:
    batches = fake_batches(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in batches.items():
        (directory / name).write_bytes(batch_bytes(images, labels))
    return batches


def write_archive(path: Path, *, seed: int, replace: dict[str, bytes] | None = None) -> dict:
    """cifar-10-python.tar.gz with cifar-10-batches-py/<batch> members."""
    batches = fake_batches(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for name, (images, labels) in batches.items():
            raw = (replace or {}).get(name, batch_bytes(images, labels))
            info = tarfile.TarInfo(f"{cifar10.BATCH_DIR}/{name}")
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))
    return batches


def scaled(images: np.ndarray, bits: int = 8) -> torch.Tensor:
    return torch.from_numpy((images >> (8 - bits)).astype(np.float32) / (2**bits - 1))


def test_split_scaling_and_provenance(tmp_path):
    batches = write_folder(tmp_path / "d" / "cifar-10-batches-py", seed=0)
    data = load_dataset("cifar10", data_dir=tmp_path / "d", download=False)
    train = np.concatenate([batches[name][0] for name in cifar10.TRAIN_BATCHES])
    num_train = 5 * PER_BATCH - NUM_VALID
    assert data.image_shape == (3, 32, 32) and data.data_size == SIZE and data.num_levels == 256
    assert torch.equal(data.train, scaled(train[:num_train]))
    assert torch.equal(data.valid, scaled(train[num_train:]))  # the last NUM_VALID training images
    assert torch.equal(data.test, scaled(batches[cifar10.TEST_BATCH][0]))
    assert data.train.min() == 0 and data.train.max() == 1
    provenance = json.loads(json.dumps(data.provenance))
    assert provenance["found_via"] == "data_dir / --data-dir" and provenance["bits"] == 8
    assert provenance["split"]["sizes"] == {"train": num_train, "valid": NUM_VALID, "test": NUM_TEST}
    sha = hashlib.sha256(train[:num_train].tobytes()).hexdigest()
    assert provenance["split"]["sha256"]["train"] == sha


def test_channels_first_layout(tmp_path):
    """A row of b"data" is the R, G, B planes: pixel (c, h, w) is column c * 1024 + h * 32 + w."""
    batches = write_folder(tmp_path / "d", seed=1)
    data = load_dataset("cifar10", data_dir=tmp_path / "d", download=False)
    image = data.train[0].reshape(3, 32, 32)
    row = batches["data_batch_1"][0][0]
    assert image[2, 5, 7] == row[2 * 1024 + 5 * 32 + 7] / 255


def test_bits_reduce_levels(tmp_path):
    batches = write_folder(tmp_path / "d", seed=2)
    data = load_dataset("cifar10", data_dir=tmp_path / "d", download=False, bits=3)
    assert data.num_levels == 8
    assert torch.equal(data.test, scaled(batches[cifar10.TEST_BATCH][0], bits=3))
    assert set((data.train * 7).round().unique().tolist()) <= set(range(8))
    with pytest.raises(DataError, match="bits = 4 applies to cifar10 only"):
        load_dataset("digits", bits=4)
    with pytest.raises(DataError, match="choose bits from 1 to 8"):
        load_dataset("cifar10", data_dir=tmp_path / "d", download=False, bits=9)


def test_archive_is_read_in_place_and_folder_wins(tmp_path):
    root = tmp_path / "root"
    from_archive = write_archive(root / cifar10.ARCHIVE, seed=3)
    data = load_dataset("cifar10", data_dir=root, download=False)
    assert torch.equal(data.test, scaled(from_archive[cifar10.TEST_BATCH][0]))
    assert not (root / cifar10.BATCH_DIR).exists()  # nothing extracted
    from_folder = write_folder(root / "cifar10", seed=4)  # DIR/cifar10 comes before DIR
    data = load_dataset("cifar10", data_dir=root, download=False)
    assert torch.equal(data.test, scaled(from_folder[cifar10.TEST_BATCH][0]))


def test_search_order(tmp_path, monkeypatch):
    given = write_folder(tmp_path / "given", seed=5)
    env = write_folder(tmp_path / "env", seed=6)
    cache = write_folder(tmp_path / "cache" / "gapbench" / "cifar10", seed=7)
    monkeypatch.setenv("GAPBENCH_DATA", str(tmp_path / "env"))

    def test_images(**kwargs) -> torch.Tensor:
        return load_dataset("cifar10", download=False, **kwargs).test

    assert torch.equal(test_images(data_dir=tmp_path / "given"), scaled(given[cifar10.TEST_BATCH][0]))
    assert torch.equal(test_images(), scaled(env[cifar10.TEST_BATCH][0]))
    monkeypatch.delenv("GAPBENCH_DATA")
    assert torch.equal(test_images(), scaled(cache[cifar10.TEST_BATCH][0]))


def test_not_found_message(tmp_path):
    with pytest.raises(DataError) as error:
        load_dataset("cifar10", data_dir=tmp_path / "nowhere", download=False)
    message = str(error.value)
    assert "CIFAR-10 not found" in message and str(tmp_path / "nowhere") in message
    assert "Downloading was switched off" in message and cifar10.ARCHIVE_MD5 in message
    assert "--data-dir" in message and "GAPBENCH_DATA" in message


def test_code_in_a_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    write_folder(tmp_path / "d", seed=8)
    (tmp_path / "d" / "data_batch_3").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_3: not a CIFAR-10 batch \(refused global (posix|os)\.system"):
        load_dataset("cifar10", data_dir=tmp_path / "d", download=False)
    assert not marker.exists()


@pytest.mark.parametrize("content, pattern", [
    (pickle.dumps([1, 2, 3], protocol=2), "expected a dict with b'data' and b'labels'"),
    (pickle.dumps({b"data": np.zeros((3, 10), np.uint8), b"labels": [0, 1, 2]}, protocol=2),
     r"expected uint8 of shape \(N, 3072\)"),
    (pickle.dumps({b"data": np.zeros((3, SIZE), np.float32), b"labels": [0, 1, 2]}, protocol=2),
     r"b'data' is a float32 array"),
    (pickle.dumps({b"data": np.zeros((3, SIZE), np.uint8), b"labels": [0, 1]}, protocol=2),
     "expected one label 0..9 per image"),
    (pickle.dumps({b"data": np.zeros((3, SIZE), np.uint8), b"labels": [0, 1, 10]}, protocol=2),
     "expected one label 0..9 per image"),
    (b"\x80\x02}q\x00(", "cut short or corrupt"),
])
def test_malformed_batches_are_refused(tmp_path, content, pattern):
    write_folder(tmp_path / "d", seed=9)
    (tmp_path / "d" / "data_batch_2").write_bytes(content)
    with pytest.raises(DataError, match=pattern):
        load_dataset("cifar10", data_dir=tmp_path / "d", download=False)


def test_wrong_counts_and_broken_archives(tmp_path):
    write_folder(tmp_path / "d", seed=10)
    extra = batch_bytes(np.zeros((PER_BATCH + 1, SIZE), np.uint8), [0] * (PER_BATCH + 1))
    (tmp_path / "d" / "data_batch_5").write_bytes(extra)
    with pytest.raises(DataError, match=f"hold {5 * PER_BATCH + 1} images, expected {5 * PER_BATCH}"):
        load_dataset("cifar10", data_dir=tmp_path / "d", download=False)
    archive = tmp_path / "a" / cifar10.ARCHIVE
    write_archive(archive, seed=11)
    archive.write_bytes(archive.read_bytes()[:200])  # cut short
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset("cifar10", data_dir=tmp_path / "a", download=False)


def test_download_from_file_url_with_checksum(tmp_path, monkeypatch):
    server = tmp_path / "server" / cifar10.ARCHIVE
    batches = write_archive(server, seed=12)
    monkeypatch.setattr(cifar10, "URLS", (server.as_uri(),))
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", hashlib.md5(server.read_bytes()).hexdigest())
    data = load_dataset("cifar10", download=True)
    cached = tmp_path / "cache" / "gapbench" / "cifar10" / cifar10.ARCHIVE
    assert cached.read_bytes() == server.read_bytes()
    assert torch.equal(data.test, scaled(batches[cifar10.TEST_BATCH][0]))
    assert data.provenance["found_via"] == "download" and data.provenance["downloaded_from"] == server.as_uri()
    again = load_dataset("cifar10", download=False)  # now found in the cache
    assert again.provenance["found_via"] == "user cache"


def test_checksum_mismatch_keeps_nothing(tmp_path, monkeypatch):
    server = tmp_path / "server" / cifar10.ARCHIVE
    write_archive(server, seed=13)
    monkeypatch.setattr(cifar10, "URLS", (server.as_uri(),))
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", "0" * 32)
    with pytest.raises(DataError) as error:
        load_dataset("cifar10", download=True)
    message = str(error.value)
    assert "MD5 mismatch" in message and "Downloading into" in message and "0" * 32 in message
    cache = tmp_path / "cache" / "gapbench" / "cifar10"
    assert list(cache.iterdir()) == []  # no partial or unverified file

