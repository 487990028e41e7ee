"""Tests for gapbench.data: digits, the Dataset container, IDX files, binarisation."""

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets
import torch

from gapbench.data import (
    DATASETS,
    DataError,
    Dataset,
    binarize,
    check_binary,
    check_finite,
    check_values,
    load_dataset,
    read_idx,
    write_idx,
)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# --- digits ------------------------------------------------------------------------------------


def test_digits_shapes_range_and_provenance():
    data = load_dataset("digits")
    assert data.name == "digits" and "digits" in DATASETS
    assert data.train.shape == (1197, 64)
    assert data.valid.shape == (300, 64)
    assert data.test.shape == (300, 64)
    assert data.image_shape == (8, 8) and data.data_size == 64
    for split in ("train", "valid", "test"):
        x = data.split(split)
        assert x.dtype == torch.float32
        assert x.min() >= 0 and x.max() <= 1
    assert data.train.max() == 1  # 16 / 16 occurs
    provenance = json.loads(json.dumps(data.provenance))
    assert provenance["split"]["sizes"] == {"train": 1197, "valid": 300, "test": 300}
    assert provenance["split"]["seed"] == 0
    assert provenance["source"].startswith("scikit-learn ")


def test_digits_split_is_deterministic():
    first, second = load_dataset("digits"), load_dataset("digits")
    for split in ("train", "valid", "test"):
        assert torch.equal(first.split(split), second.split(split))
    assert first.provenance == second.provenance


def test_digits_splits_partition_the_images():
    """Every one of the 1797 images is in exactly one split (compared as multisets of rows)."""
    data = load_dataset("digits")
    levels = torch.cat([data.train, data.valid, data.test]) * 16  # (1797, 64)
    assert torch.equal(levels, levels.round())
    ours = np.sort(levels.numpy().astype(np.uint8).view("V64").ravel())  # each row as one item
    reference = sklearn.datasets.load_digits().data.astype(np.uint8)  # (1797, 64)
    assert np.array_equal(ours, np.sort(reference.view("V64").ravel()))


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="unknown dataset 'cifar100'.*digits, fashion-mnist, mnist"):
        load_dataset("cifar100")
    with pytest.raises(DataError, match="unknown split 'validation'.*train, valid, test"):
        load_dataset("digits").split("validation")


# --- Dataset and check_values -------------------------------------------------------------------


def _dataset(train: torch.Tensor) -> Dataset:
    other = torch.full((2, 4), 0.5)
    return Dataset("toy", train, other, other, (2, 2), {"source": "test"})


def test_check_values_rejects_non_finite_and_out_of_range():
    check_values(torch.tensor([0.0, 0.5, 1.0]), "fine")
    with pytest.raises(DataError, match=r"my split: 2 of 3 values are NaN or infinite"):
        check_values(torch.tensor([0.5, float("nan"), float("inf")]), "my split")
    with pytest.raises(DataError, match=r"my split: 1 of 2 values are NaN"):
        check_values(torch.tensor([float("-inf"), 0.5]), "my split")
    with pytest.raises(DataError, match=r"values span \[0, 255\], outside \[0, 1\].*divide"):
        check_values(torch.tensor([0.0, 255.0]), "my split")
    with pytest.raises(DataError, match=r"values span \[-0.1, 0.5\]"):
        check_values(torch.tensor([-0.1, 0.5]), "my split")


def test_dataset_checks_its_arrays():
    assert _dataset(torch.zeros(3, 4)).data_size == 4
    with pytest.raises(DataError, match="toy train split.*NaN"):
        _dataset(torch.tensor([[0.0, 0.0, 0.0, float("nan")]]))
    with pytest.raises(DataError, match=r"toy train split: got a torch.float64 tensor.*\(N > 0, 4"):
        _dataset(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(DataError, match=r"shape \(3, 5\)"):
        _dataset(torch.zeros(3, 5))
    with pytest.raises(TypeError, match="JSON-serialisable"):
        x = torch.zeros(1, 4)
        Dataset("toy", x, x, x, (2, 2), {"x": object()})


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian package dataset-fashion-mnist absent")
def test_fashion_mnist_from_debian_package(monkeypatch, tmp_path):
    monkeypatch.delenv("GAPBENCH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    data = load_dataset("fashion-mnist", download=False)
    assert data.train.shape == (50000, 784)
    assert data.valid.shape == (10000, 784)
    assert data.test.shape == (10000, 784)
    assert data.image_shape == (28, 28)
    assert data.train.min() == 0 and data.train.max() == 1
    assert data.provenance["directory"] == str(FASHION_DIR)
    assert data.provenance["found_via"] == "system directory"
    json.dumps(data.provenance)


# --- IDX files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    write_idx(tmp_path / f"images{suffix}", images)
    write_idx(tmp_path / f"labels{suffix}", labels)
    assert (tmp_path / f"images{suffix}").read_bytes()[:2] == (b"\x1f\x8b" if suffix else b"\0\0")
    read_images = read_idx(tmp_path / f"images{suffix}", ndim=3)
    assert read_images.dtype == np.uint8 and np.array_equal(read_images, images)
    assert np.array_equal(read_idx(str(tmp_path / f"labels{suffix}")), labels)
    read_images[0, 0, 0] = 1  # the result is an ordinary writable array
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "f.gz", images.astype(np.int32))


def _write_raw(path: Path, raw: bytes) -> Path:
    path.write_bytes(gzip.compress(raw))
    return path


def test_idx_wrong_magic(tmp_path):
    floats = bytes([0, 0, 0x0D, 1]) + (3).to_bytes(4, "big") + bytes(12)  # a valid float32 IDX
    path = _write_raw(tmp_path / "f.gz", floats)
    with pytest.raises(DataError, match=r"f\.gz: wrong IDX magic number 0x00000d01"):
        read_idx(path)
    write_idx(tmp_path / "labels.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(
        DataError,
        match=r"labels\.gz: wrong IDX magic number 0x00000801, expected "
        r"0x00000803.*Fix: replace it",
    ):
        read_idx(tmp_path / "labels.gz", ndim=3)
    html = _write_raw(tmp_path / "page.gz", b"<!DOCTYPE html>")
    with pytest.raises(DataError, match="wrong IDX magic number 0x3c21444f"):
        read_idx(html)


def test_idx_truncated_or_corrupt_gzip(tmp_path):
    write_idx(tmp_path / "full.gz", np.arange(200, dtype=np.uint8).reshape(2, 10, 10))
    raw = (tmp_path / "full.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cut\.gz: the gzip stream is truncated or corrupt.*Fix"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "bad_crc.gz").write_bytes(raw[:-8] + bytes(8))
    with pytest.raises(DataError, match=r"bad_crc\.gz: the gzip stream is truncated or corrupt"):
        read_idx(tmp_path / "bad_crc.gz")


def test_idx_wrong_payload_length(tmp_path):
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (2, 28, 28))
    short = _write_raw(tmp_path / "short.gz", header + bytes(2 * 784 - 1))
    pattern = r"short\.gz: wrong payload length.*\(2, 28, 28\).*1568 bytes.*holds 1567"
    with pytest.raises(DataError, match=pattern):
        read_idx(short)
    long = _write_raw(tmp_path / "long.gz", header + bytes(2 * 784 + 5))
    with pytest.raises(DataError, match=r"long\.gz: wrong payload length.*holds 1573"):
        read_idx(long)
    cut_header = _write_raw(tmp_path / "header.gz", header[:9])
    with pytest.raises(DataError, match=r"header\.gz: the IDX header is cut short"):
        read_idx(cut_header)
    with pytest.raises(DataError, match=r"missing\.gz: no such file"):
        read_idx(tmp_path / "missing.gz")


# --- binarize -----------------------------------------------------------------------------------


def test_binarize_static_is_exact():
    x = torch.tensor([[0.0, 0.3, 0.5, 0.51, 1.0]])
    assert torch.equal(binarize(x, mode="static"), torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]]))
    low = binarize(x, mode="static", threshold=0.25)
    assert torch.equal(low, torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]]))
    assert binarize(x.double(), mode="static").dtype == torch.float64


def test_binarize_dynamic_mean_matches_probabilities():
    num_draws, num_pixels = 2000, 500
    p = torch.linspace(0.0, 1.0, num_pixels)  # (D,) includes the exact 0 and 1
    generator = torch.Generator().manual_seed(0)
    b = binarize(p.expand(num_draws, num_pixels), mode="dynamic", generator=generator)  # (S, D)
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(b[:, 0] == 0) and torch.all(b[:, -1] == 1)
    mean = b.mean(0)  # (D,)
    stderr = (p * (1 - p) / num_draws).sqrt()  # binomial standard error of each pixel's mean
    inner = slice(1, -1)
    assert torch.all((mean[inner] - p[inner]).abs() < 5 * stderr[inner])
    # All pixels pooled: the average error has standard error sqrt(sum p(1-p) / S) / D.
    pooled_stderr = math.sqrt(float((p * (1 - p)).sum()) / num_draws) / num_pixels
    assert abs(float((mean - p).mean())) < 4 * pooled_stderr


def test_binarize_dynamic_uses_the_generator():
    x = torch.rand(64, 784, generator=torch.Generator().manual_seed(1))
    first = binarize(x, mode="dynamic", generator=torch.Generator().manual_seed(3))
    again = binarize(x, mode="dynamic", generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    generator = torch.Generator().manual_seed(3)
    epoch1 = binarize(x, mode="dynamic", generator=generator)
    epoch2 = binarize(x, mode="dynamic", generator=generator)
    assert torch.equal(epoch1, first) and not torch.equal(epoch1, epoch2)  # resampled each call


def test_binarize_rejects_bad_arguments():
    x = torch.full((2, 3), 0.5)
    with pytest.raises(ValueError, match="unknown binarisation mode 'stochastic'"):
        binarize(x, mode="stochastic")
    for threshold in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(ValueError, match="threshold must be strictly between 0 and 1"):
            binarize(x, mode="static", threshold=threshold)


def test_check_binary_and_check_finite():
    check_binary(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), "fine")
    with pytest.raises(DataError, match=r"my data: 1 of 3 values are neither 0 nor 1.*Bernoulli.*binarise"):
        check_binary(torch.tensor([0.0, 0.5, 1.0]), "my data")
    with pytest.raises(DataError, match=r"my data: 1 of 2 values are NaN or infinite"):
        check_binary(torch.tensor([float("nan"), 1.0]), "my data")
    check_finite(torch.tensor([-3.0, 7.0]), "fine")
    with pytest.raises(DataError, match=r"x: 1 of 2 values are NaN or infinite"):
        check_finite(torch.tensor([float("-inf"), 7.0]), "x")


# --- the package's own imports -------------------------------------------------------------------


def _data_imports(package: Path) -> dict[str, set[tuple[str, str]]]:
    """For each module of gapbench.data (``__init__`` aside): the (module, name) pairs it imports from
    its sibling modules, ``name`` "" for ``import gapbench.data.x``."""
    import ast

    found = {}
    for path in package.glob("*.py"):
        if path.stem == "__init__":
            continue
        pairs = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gapbench.data."):
                pairs |= {(node.module.split(".")[2], alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module == "gapbench.data":
                pairs |= {(alias.name, "") for alias in node.names}
            elif isinstance(node, ast.Import):
                pairs |= {(a.name.split(".")[2], "") for a in node.names if a.name.startswith("gapbench.data.")}
        found[path.stem] = pairs
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """A cycle of the directed graph as a list of nodes (first = last), or [] if it has none."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target] if target in path else [node, target]
            if target not in state and (found := visit(target, path + [target])):
                return found
        state[node] = "done"
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return []


def test_data_modules_import_one_way():
    """No import cycle among gapbench.data's modules (lazy imports included), and none reaches for
    another module's private name: shared helpers live in a module of their own (download, dataset)."""
    import gapbench.data

    imports = _data_imports(Path(gapbench.data.__file__).parent)
    cycle = _cycle({module: {target for target, _ in pairs} for module, pairs in imports.items()})
    assert not cycle, "import cycle in gapbench.data: " + " -> ".join(cycle)
    private = sorted(f"{module} imports {target}.{name}" for module, pairs in imports.items()
                     for target, name in pairs if name.startswith("_"))
    assert not private, "private names imported across gapbench.data: " + ", ".join(private)
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail
