import gzip
import shutil
import struct

import pytest
import torch

from lenet_sweep.core.data import FILES, load_split
from lenet_sweep.errors import UserError
from tests.conftest import FASHION


def test_real_fashion_mnist_is_read_verified_and_scaled(make_cfg):
    cfg = make_cfg("data.train_size=null", "data.test_size=null")
    train = load_split(cfg.data, train=True, device=torch.device("cpu"))
    test = load_split(cfg.data, train=False, device=torch.device("cpu"))
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.float32
    assert train.images.min().item() == 0.0 and train.images.max().item() == 1.0
    assert torch.bincount(train.labels).tolist() == [6000] * 10  # Fashion-MNIST is balanced
    assert test.labels[:5].tolist() == [9, 2, 1, 1, 6]  # the published first test labels


def test_subset_override_takes_first_examples(make_cfg):
    cfg = make_cfg("data.train_size=100", "data.test_size=50")
    train = load_split(cfg.data, train=True, device=torch.device("cpu"))
    assert len(train) == 100 and train.num_batches(32) == 4


def test_batches_shuffle_by_permutation_and_test_order_is_fixed(make_cfg):
    cfg = make_cfg("data.train_size=300")
    split = load_split(cfg.data, train=True, device=torch.device("cpu"))
    ordered = torch.cat([y for _, y in split.batches(128)])
    assert torch.equal(ordered, split.labels)
    gen = torch.Generator().manual_seed(0)
    shuffled = torch.cat([y for _, y in split.batches(128, gen)])
    assert not torch.equal(shuffled, split.labels)
    assert sorted(shuffled.tolist()) == sorted(split.labels.tolist())  # a permutation


@pytest.fixture
def copied_root(tmp_path):
    for name in FILES.values():
        shutil.copy(FASHION / f"{name}.gz", tmp_path / f"{name}.gz")
    return tmp_path


def test_corrupted_file_is_rejected_naming_file_and_checksum(make_cfg, copied_root):
    target = copied_root / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(target.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one label changed: still a valid idx file
    target.unlink()
    (copied_root / "train-labels-idx1-ubyte").write_bytes(bytes(raw))  # plain files work too
    cfg = make_cfg(f"data.root={copied_root}")
    with pytest.raises(UserError) as err:
        load_split(cfg.data, train=True, device=torch.device("cpu"))
    msg = str(err.value)
    assert "train-labels-idx1-ubyte" in msg
    assert "expected bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9" in msg
    assert "\n" not in msg


def test_gz_files_are_decompressed_once_and_a_damaged_copy_again(
    make_cfg, copied_root, tmp_path, monkeypatch
):
    """The cache spares each start the decompression; what it serves still has its checksum."""
    from lenet_sweep.core import data

    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    cfg = make_cfg(f"data.root={copied_root}")
    first = load_split(cfg.data, train=False, device=torch.device("cpu"))
    name = FILES["test_images"]
    (images,) = (tmp_path / "cache" / "idx").glob(f"*-{name}")
    original = gzip.decompress((copied_root / f"{name}.gz").read_bytes())
    assert images.read_bytes() == original
    written = images.stat().st_mtime_ns
    data._load_split.cache_clear()  # a new process, as far as reading goes
    data._first.cache_clear()
    again = load_split(cfg.data, train=False, device=torch.device("cpu"))
    assert images.stat().st_mtime_ns == written  # read from the cache, not written again
    images.write_bytes(original[:-1] + b"x")  # damaged on disk
    data._load_split.cache_clear()
    data._first.cache_clear()
    repaired = load_split(cfg.data, train=False, device=torch.device("cpu"))
    for split in (again, repaired):
        assert torch.equal(split.images, first.images) and torch.equal(split.labels, first.labels)
    assert images.read_bytes() == original


def test_truncated_gzip_is_rejected(make_cfg, copied_root):
    target = copied_root / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:5000])
    cfg = make_cfg(f"data.root={copied_root}")
    with pytest.raises(UserError) as err:
        load_split(cfg.data, train=False, device=torch.device("cpu"))
    assert "t10k-images-idx3-ubyte.gz: truncated or not gzip" in str(err.value)
    assert (
        "expected SHA-256 5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
        in str(err.value)
    )


def test_wrong_format_file_is_rejected_before_training(make_cfg, copied_root):
    # labels where images belong: a valid gzip, a valid idx1 file, the wrong content
    shutil.copy(
        copied_root / "t10k-labels-idx1-ubyte.gz", copied_root / "t10k-images-idx3-ubyte.gz"
    )
    cfg = make_cfg(f"data.root={copied_root}")
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz: SHA-256 of the decompressed"):
        load_split(cfg.data, train=False, device=torch.device("cpu"))
    cfg = make_cfg(f"data.root={copied_root}", "data.sha256.t10k-images-idx3-ubyte=null")
    with pytest.raises(UserError, match="not a valid idx file"):
        load_split(cfg.data, train=False, device=torch.device("cpu"))


def test_missing_file_and_missing_dir(make_cfg, copied_root, tmp_path):
    (copied_root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="missing t10k-labels-idx1-ubyte"):
        load_split(make_cfg(f"data.root={copied_root}").data, False, torch.device("cpu"))
    with pytest.raises(UserError, match="no such directory"):
        load_split(make_cfg("data.root=/no/such/dir").data, False, torch.device("cpu"))


def _write_idx(folder, n, seed):
    """Tiny MNIST-format files, written the way the idx spec says."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
    return images, labels


def test_mnist_config_uses_same_loader_on_idx_files_written_here(make_cfg, tmp_path):
    splits = {"train": 64, "t10k": 32}
    data = {}
    for prefix, n in splits.items():
        images, labels = _write_idx(tmp_path, n, seed=n)
        head = struct.pack(">IIII", 0x803, n, 28, 28)
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(head + images.numpy().tobytes())
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x801, n) + labels.numpy().tobytes()
        )
        data[prefix] = (images, labels)
    cfg = make_cfg(
        "data=mnist",
        f"data.root={tmp_path}",
        "data.num_train=64",
        "data.num_test=32",
        "data.train_size=null",
        "data.test_size=null",
    )
    train = load_split(cfg.data, train=True, device=torch.device("cpu"))
    assert torch.equal(train.labels, data["train"][1].long())
    assert torch.allclose(train.images[:, 0], data["train"][0].float() / 255)
    with pytest.raises(UserError, match=r"expected \(60000, 28, 28\)"):
        load_split(make_cfg("data=mnist", f"data.root={tmp_path}").data, True, torch.device("cpu"))


def test_validation_images_are_a_fixed_draw_held_out_of_the_training_set(make_cfg):
    """The same held-out images for any seed and slice; none of them trained on; train_size
    counted among the others."""
    from lenet_sweep.core.data import load_splits, validation_indices

    held, kept = validation_indices(60000, 5000)
    again, _ = validation_indices(60000, 5000)
    assert torch.equal(held, again) and len(held) == 5000 and len(kept) == 55000
    assert not set(held.tolist()) & set(kept.tolist())
    cpu = torch.device("cpu")
    small = load_splits(make_cfg("data.train_size=1000", "seed=1").data, cpu, 500)
    other = load_splits(make_cfg("data.train_size=3000", "seed=7").data, cpu, 500)
    whole = load_split(make_cfg("data.train_size=null").data, True, cpu)
    assert torch.equal(small.val.images, other.val.images)  # whatever the slice or the seed
    assert torch.equal(small.val.images, whole.images[validation_indices(60000, 500)[0]])
    assert torch.equal(small.train.images, other.train.images[:1000])
    assert len(small.train) == 1000 and len(small.val) == 500
    assert list(small.evaluated()) == ["val", "test"]
    assert len(small.val.sha256["images"]) == 64 and small.val.sha256 != small.train.sha256
