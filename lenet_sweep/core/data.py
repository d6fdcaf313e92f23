"""Fashion-MNIST (or MNIST) idx files -> whole splits as tensors on the training device.

Like airbench, the data lives on the device and batches are drawn by indexing with an on-device
permutation, so the hot path has no DataLoader and no host round trip.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lenet_sweep.errors import UserError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lenet_sweep"


@dataclass
class Split:
    """Images as float in [0, 1] (what ToTensor gives), shape (N, 1, 28, 28); labels int64."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str = ""  # the folder the files were read from
    sha256: dict[str, str] = field(default_factory=dict)  # images, labels: of the files read

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        """Yield (X, y) batches; shuffled through an on-device permutation when given a generator."""
        n, device = len(self.labels), self.labels.device
        order = None if generator is None else torch.randperm(n, device=device, generator=generator)
        for start in range(0, n, batch_size):
            batch = slice(start, start + batch_size)
            idx = batch if order is None else order[batch]
            yield self.images[idx], self.labels[idx]

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self.labels) // batch_size)


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def resolve_root(data_cfg) -> Path:
    """The folder holding the four idx files: data.root, else Debian's folder, else a download."""
    if data_cfg.root is not None:
        root = Path(str(data_cfg.root)).expanduser()
        if not root.is_dir():
            raise UserError(
                f"data.root={data_cfg.root}: no such directory; "
                "point data.root at a folder with the four idx files"
            )
        return root
    if data_cfg.system_root and Path(data_cfg.system_root).is_dir():
        return Path(data_cfg.system_root)
    return _download(data_cfg)


def _download(data_cfg) -> Path:
    import torchvision.datasets as tvd

    cache = CACHE_DIR / "torchvision"
    dataset_cls = getattr(tvd, data_cfg.torchvision_class)
    try:
        dataset_cls(str(cache), train=True, download=True)
        dataset_cls(str(cache), train=False, download=True)
    except Exception as e:  # noqa: BLE001 - any network failure ends in the same advice
        raise UserError(
            f"could not download {data_cfg.name} ({type(e).__name__}: {e}); "
            "install Debian's dataset-fashion-mnist or set data.root to a folder with the idx files"
        ) from e
    return cache / data_cfg.torchvision_class / "raw"


def _expected(sha: str | None) -> str:
    return f"expected SHA-256 {sha} once decompressed" if sha else "expected an idx file"


def _decompressed(path: Path, expected_sha: str | None) -> tuple[Path, str, bytes]:
    """Plain idx file for `path`, its SHA-256 and its bytes (read once: hashed and parsed from
    the same bytes). A gz file is decompressed once into the cache, found again by the SHA-256
    of its compressed bytes (hashing is faster than decompressing at every start); the cached
    copy's name records the SHA-256 it was written with, and a copy
    that no longer has it is decompressed again."""
    if path.suffix != ".gz":
        raw = path.read_bytes()
        return path, hashlib.sha256(raw).hexdigest(), raw
    packed = path.read_bytes()
    key = hashlib.sha256(packed).hexdigest()
    for cached in (CACHE_DIR / "idx").glob(f"{key}-*-{path.stem}"):
        recorded = cached.name[len(key) + 1 :].split("-", 1)[0]
        raw = cached.read_bytes()
        if hashlib.sha256(raw).hexdigest() == recorded:
            return cached, recorded, raw
    try:
        raw = gzip.decompress(packed)
    except (OSError, EOFError) as e:
        raise UserError(
            f"{path}: truncated or not gzip ({e}); {_expected(expected_sha)}: "
            "replace it with the original file"
        ) from e
    digest = hashlib.sha256(raw).hexdigest()
    target = CACHE_DIR / "idx" / f"{key}-{digest}-{path.stem}"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(raw)
    tmp.replace(target)  # atomic: parallel jobs never read a half-written file
    return target, digest, raw


def _read(path: Path, name: str, expected_sha: str | None) -> tuple[torch.Tensor, str]:
    _, digest, raw = _decompressed(path, expected_sha)
    if expected_sha and digest != expected_sha:
        raise UserError(
            f"{path}: SHA-256 of the decompressed {name} is {digest}, expected {expected_sha}; "
            "the file is corrupted or not the original: reinstall or re-download it"
        )
    try:
        return parse_idx(raw, ndim=3 if "images" in name else 1), digest
    except ValueError as e:
        raise UserError(
            f"{path}: not a valid idx file ({e}); {_expected(expected_sha)}: "
            "replace it with the original file"
        ) from e


def parse_idx(raw: bytes, ndim: int) -> torch.Tensor:
    """idx bytes of unsigned bytes: magic 0x00 0x00 0x08 <ndim>, the sizes as big-endian uint32,
    then the data. (Parsed here: importing torchvision for it costs a second a start.)"""
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 8, ndim]):
        raise ValueError(f"the header is not that of {ndim}-d unsigned bytes")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(shape):
        raise ValueError(f"{len(raw) - header} bytes of data for the shape {shape}")
    # One writable copy (torch.frombuffer wants one), the header skipped in place.
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).reshape(shape)


def load_split(data_cfg, train: bool, device: torch.device) -> Split:
    """One split on `device` (float images scaled by 1/255), its first train_size / test_size
    examples. Files are read and verified once per process, and each slice is made once: the
    trials of an in-process sweep share the tensors (read-only)."""
    limit = data_cfg.train_size if train else data_cfg.test_size
    return _first(_files(data_cfg), train, limit, str(device))


# Which training images a sweep holds out for validation: a fixed draw, the same for every trial
# of every study whatever its seed, disjoint from what any trial trains on.
VALIDATION_SEED = 0


def validation_indices(n: int, val_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the held-out images' indices, the others' in their file order), of n training images."""
    draw = torch.randperm(n, generator=torch.Generator().manual_seed(VALIDATION_SEED))
    held = draw[:val_size].sort().values
    kept = torch.ones(n, dtype=torch.bool)
    kept[held] = False
    return held, kept.nonzero().squeeze(1)


@dataclass(frozen=True)
class Splits:
    """What a run trains on and is evaluated on, on one device: the training images (the first
    train_size of those not held out), the test split, and in a sweep the validation images."""

    train: Split
    test: Split
    val: Split | None = None

    def evaluated(self) -> dict[str, Split]:
        """The splits evaluated after each epoch, by the name their metrics start with (the
        validation's first: a sweep's objective)."""
        return {**({"val": self.val} if self.val is not None else {}), "test": self.test}

    def sizes(self) -> dict[str, int]:
        """Each split's examples, by name: what an epoch's sums are divided by."""
        return {"train": len(self.train), **{k: len(v) for k, v in self.evaluated().items()}}


def load_splits(data_cfg, device: torch.device, val_size: int = 0) -> Splits:
    """The training and the test split; with `val_size`, that many training images held out
    (validation_indices) as the validation split, train_size counted among the others."""
    if not val_size:
        return Splits(load_split(data_cfg, True, device), load_split(data_cfg, False, device))
    train, val = _held_out(_files(data_cfg), val_size, data_cfg.train_size, str(device))
    return Splits(train, load_split(data_cfg, False, device), val)


def _files(data_cfg) -> str:
    """What identifies the files of a data config (its slices left out), as YAML."""
    from omegaconf import OmegaConf

    files = OmegaConf.to_container(data_cfg, resolve=True)
    for size in ("train_size", "test_size", "val_size"):
        files.pop(size, None)
    return OmegaConf.to_yaml(files)


@functools.lru_cache(maxsize=8)
def _first(files: str, train: bool, limit: int | None, device: str) -> Split:
    return _on_device(_load_split(files, train), slice(limit), device)


@functools.lru_cache(maxsize=4)
def _held_out(files: str, val_size: int, train_size: int | None, device: str):
    """(training, validation) Splits; the validation's digest is its own images' SHA-256."""
    raw = _load_split(files, True)
    held, kept = validation_indices(len(raw.labels), val_size)
    train, val = _on_device(raw, kept[:train_size], device), _on_device(raw, held, device)
    digest = hashlib.sha256(raw.images[held].numpy().tobytes()).hexdigest()
    return train, Split(val.images, val.labels, val.source, {"images": digest})


def _on_device(raw: Split, index, device: str) -> Split:
    images = raw.images[index].to(device).unsqueeze(1).float().div_(255)
    labels = raw.labels[index].to(device=device, dtype=torch.long)
    return Split(images, labels, raw.source, raw.sha256)


@functools.lru_cache(maxsize=4)
def _load_split(files: str, train: bool) -> Split:
    """The whole split as read and verified: uint8 images on the CPU."""
    from omegaconf import OmegaConf

    data_cfg = OmegaConf.create(files)
    root = resolve_root(data_cfg)
    prefix = "train" if train else "test"
    tensors, digests = {}, {}
    for kind in ("images", "labels"):
        name = FILES[f"{prefix}_{kind}"]
        path = _find(root, name)
        if path is None:
            raise UserError(
                f"{root}: missing {name} (or {name}.gz); "
                "put the four idx files there or install Debian's dataset-fashion-mnist"
            )
        expected = (data_cfg.sha256 or {}).get(name)
        tensors[kind], digests[kind] = _read(path, name, expected)
    images, labels = tensors["images"], tensors["labels"]
    expected_n = data_cfg.num_train if train else data_cfg.num_test
    if images.shape != (expected_n, 28, 28) or labels.shape != (expected_n,):
        raise UserError(
            f"{root}: {prefix} split has images {tuple(images.shape)} and labels "
            f"{tuple(labels.shape)}, expected ({expected_n}, 28, 28) and ({expected_n},); "
            f"use the original files or set data.num_{prefix}"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= data_cfg.num_classes:
        raise UserError(
            f"{root}: {prefix} labels outside 0..{data_cfg.num_classes - 1}; "
            "use the original label files"
        )
    return Split(images, labels, str(root), digests)
