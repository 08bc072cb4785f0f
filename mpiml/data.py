"""Sharded datasets: every rank reads only the rows it trains or tests on.

A *source* yields rows by index: the bundled ``digits`` set (streamed from
scikit-learn's CSV, keeping only requested lines), a ``synthetic`` set whose
row i is a pure function of (seed, i), or arrays in a file (``.npz`` stored
without compression, or a folder with ``X.npy`` and ``y.npy``), memory-mapped
so that reading rows touches only those rows.

The train/test split is fixed and independent of the number of ranks: row i
is a test row when a hash of i falls below ``test_fraction``. Rank r of K
owns the contiguous block ``[r N / K, (r+1) N / K)`` of rows; its test rows
are the test rows of its block. Train order per epoch is either

- ``local``: a permutation of the rank's own train rows, seeded by
  (seed, epoch, rank); the rows are read once and kept; or
- ``global``: one permutation of all N rows per epoch (a keyed Feistel
  network, so each rank computes only its own slice of it, never the whole
  permutation); rank r takes positions ``[r N / K, (r+1) N / K)`` of it,
  drops test rows, and reads those rows for the epoch.
"""

from __future__ import annotations

import gzip
import os
import zipfile
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.lib.format as npformat

__all__ = ["DataError", "Source", "open_source", "is_test_row", "block", "feistel_permutation", "ShardedData",
           "DIGITS_ROWS", "SPLIT_SEED"]

DIGITS_ROWS = 1797
SPLIT_SEED = 0x5EED  # fixed: the same test set for every --seed and every K


class DataError(ValueError):
    """A problem with the data the user asked for; the message names it."""


class Source(Protocol):
    n: int
    sample_shape: tuple[int, ...]
    num_classes: int | None
    name: str

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``rows`` (any order, repeats allowed) as (float32 samples, int64 labels)."""
        ...


# ---------------------------------------------------------------- hashing helpers

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast, well-spread bijection on uint64 (wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def _hash(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    h = _mix(np.asarray(seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
    for k in keys:
        with np.errstate(over="ignore"):
            h = _mix(h ^ (np.asarray(k).astype(np.uint64) * _GOLDEN))
    return h


def _uniform(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    """Uniform floats in (0, 1) from the top 53 bits of a hash."""
    return ((_hash(seed, *keys) >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def is_test_row(rows: np.ndarray, test_fraction: float) -> np.ndarray:
    """Which of ``rows`` belong to the fixed test set."""
    return _uniform(SPLIT_SEED, rows) < test_fraction


def block(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block of ``n`` rows out of ``size`` (the first n % size get one more)."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def feistel_permutation(positions: np.ndarray, n: int, key: int) -> np.ndarray:
    """Entries of one pseudo-random permutation of ``range(n)`` at ``positions``.

    A 4-round balanced Feistel network on the smallest even number of bits
    covering n, keyed by ``key``, with cycle walking: values that land
    outside ``range(n)`` are permuted again until they fall inside. The
    result is a bijection on ``range(n)``, computed for the requested
    positions only.
    """
    positions = np.asarray(positions, dtype=np.uint64)
    if n <= 1:
        return positions.astype(np.int64)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)

    def rounds(v: np.ndarray) -> np.ndarray:
        left, right = v >> shift, v & mask
        for i in range(4):
            left, right = right, left ^ (_hash(key, i, right) & mask)
        return (left << shift) | right

    out = rounds(positions)
    outside = out >= np.uint64(n)
    while outside.any():
        out[outside] = rounds(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


# ---------------------------------------------------------------- sources

class DigitsSource:
    """scikit-learn's bundled 8x8 digits (1797 rows, 10 classes), pixels scaled to [0, 1]."""

    name = "digits"
    n = DIGITS_ROWS
    sample_shape = (1, 8, 8)
    num_classes = 10

    def __init__(self) -> None:
        from importlib import resources
        self.path = str(resources.files("sklearn.datasets") / "data" / "digits.csv.gz")
        if not os.path.exists(self.path):
            raise DataError(f"digits: scikit-learn's data file {self.path} is missing (reinstall scikit-learn)")

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        wanted = np.unique(rows)
        found: dict[int, np.ndarray] = {}
        with gzip.open(self.path, "rt") as f:
            pick = iter(wanted.tolist())
            target = next(pick, None)
            for i, line in enumerate(f):
                if target is None:
                    break
                if i == target:
                    found[i] = np.array(line.split(","), dtype=np.float32)
                    target = next(pick, None)
        if len(found) != len(wanted):
            raise DataError(f"digits: {self.path} has fewer than {int(wanted[-1]) + 1} rows")
        table = np.stack([found[i] for i in wanted.tolist()]) if len(wanted) else np.zeros((0, 65), np.float32)
        where = np.searchsorted(wanted, rows)
        x = (table[where, :64] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
        return x, table[where, 64].astype(np.int64)


class SyntheticSource:
    """A Gaussian-mixture classification set: row i is a function of (seed, i) alone.

    Label ``y_i = hash(seed, i) mod classes``; features are the class centre
    (drawn once from ``seed``, scaled by ``separation``) plus unit normal noise
    hashed from (seed, i, feature). Any rank can make any row, so no rank
    ever holds more than the rows it asked for.
    """

    name = "synthetic"

    def __init__(self, samples: int, features: int, classes: int, seed: int, separation: float = 1.0) -> None:
        for flag, value, least in (("--samples", samples, 1), ("--features", features, 1), ("--classes", classes, 2)):
            if value < least:
                raise DataError(f"synthetic: {flag} must be at least {least}, got {value}")
        if not separation > 0:
            raise DataError(f"synthetic: --separation must be positive, got {separation}")
        self.n, self.sample_shape, self.num_classes, self.seed = samples, (features,), classes, seed
        rng = np.random.default_rng([seed, 0xC3])
        self.centres = (rng.standard_normal((classes, features)) * separation).astype(np.float32)

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        labels = (_hash(self.seed, rows, 1) % np.uint64(self.num_classes)).astype(np.int64)
        cols = np.arange(self.sample_shape[0], dtype=np.int64)
        u1 = _uniform(self.seed, rows[:, None], cols[None, :], 2)
        u2 = _uniform(self.seed, rows[:, None], cols[None, :], 3)
        noise = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)  # Box-Muller
        return (self.centres[labels] + noise).astype(np.float32), labels


class ArraySource:
    """``X`` and ``y`` from a file, memory-mapped; reading rows touches only those rows."""

    def __init__(self, path: str) -> None:
        self.name = path
        try:
            os.stat(path)
        except OSError as e:  # a symlink loop is not "no such file"
            raise DataError(f"--data {path}: {(e.strerror or str(e)).lower()}") from None
        if not os.access(path, os.R_OK):
            raise DataError(f"--data {path}: permission denied")
        if os.path.isdir(path):
            self.x, self.y = (_open_npy(os.path.join(path, f"{k}.npy"), k, path) for k in ("X", "y"))
        elif path.endswith(".npz"):
            self.x, self.y = (_open_npz_member(path, k) for k in ("X", "y"))
        else:
            raise DataError(f"--data {path}: expected a .npz file or a folder holding X.npy and y.npy")
        if self.x.ndim < 2:
            raise DataError(f"--data {path}: X must have one row per sample (2 or more dimensions), "
                            f"got shape {self.x.shape}")
        if self.y.ndim != 1:
            raise DataError(f"--data {path}: y must be 1-D (one label per row), got shape {self.y.shape}")
        if len(self.x) != len(self.y):
            raise DataError(f"--data {path}: X has {len(self.x)} rows but y has {len(self.y)}")
        if not np.issubdtype(self.x.dtype, np.number) or np.issubdtype(self.x.dtype, np.complexfloating):
            raise DataError(f"--data {path}: X must be real numbers, got dtype {self.x.dtype}")
        if not np.issubdtype(self.y.dtype, np.integer):
            raise DataError(f"--data {path}: y must hold integer class labels, got dtype {self.y.dtype}")
        if len(self.y) == 0:
            raise DataError(f"--data {path}: X and y hold no rows")
        if self.x[0].size == 0:
            raise DataError(f"--data {path}: X has no features (shape {self.x.shape})")
        self.n, self.sample_shape, self.num_classes = len(self.y), tuple(self.x.shape[1:]), None

    def scan(self, lo: int, hi: int, chunk_bytes: int = 1 << 24) -> tuple[int, int]:
        """Rows ``[lo, hi)``: the smallest and largest label (exact, in y's own dtype), checking that every
        sample is finite as float32 (what training sees); raises DataError naming the first bad row."""
        low, high = None, None
        step = max(1, chunk_bytes // max(1, self.x[0].nbytes))
        for start in range(lo, hi, step):
            stop = min(hi, start + step)
            try:
                with np.errstate(over="ignore", invalid="ignore"):
                    x = np.asarray(self.x[start:stop], dtype=np.float32).reshape(stop - start, -1)
                y = np.asarray(self.y[start:stop])
            except OSError as e:
                raise DataError(f"--data {self.name}: reading rows failed: {e}") from None
            finite = np.isfinite(x).all(axis=1)
            if not finite.all():
                row = start + int(np.flatnonzero(~finite)[0])
                raise DataError(f"--data {self.name}: X row {row} holds NaN or Inf (or a value too large for "
                                f"float32); every sample must be finite")
            low = int(y.min()) if low is None else min(low, int(y.min()))
            high = int(y.max()) if high is None else max(high, int(y.max()))
        return (0, -1) if low is None or high is None else (low, high)

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")  # ascending offsets: sequential reads of the mapping
        x = np.empty((len(rows), *self.sample_shape), dtype=np.float32)
        y = np.empty(len(rows), dtype=np.int64)
        try:
            x[order] = self.x[rows[order]]
            y[order] = self.y[rows[order]]
        except OSError as e:
            raise DataError(f"--data {self.name}: reading rows failed: {e}") from None
        return x, y


def _open_npy(path: str, key: str, folder: str) -> np.ndarray:
    if not os.path.lexists(path):
        raise DataError(f"--data {folder}: the folder has no {key}.npy")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"--data {path}: not a readable .npy file ({e})") from None


def _open_npz_member(path: str, key: str) -> np.ndarray:
    """Memory-map member ``key.npy`` of an uncompressed .npz (np.load would read it whole)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if f"{key}.npy" not in names:
                raise DataError(f"--data {path}: no array named {key!r} in the file (it has "
                                f"{', '.join(n.removesuffix('.npy') for n in names) or 'none'})")
            info = z.getinfo(f"{key}.npy")
            if info.compress_type != zipfile.ZIP_STORED:
                raise DataError(f"--data {path}: {key} is compressed and cannot be memory-mapped; "
                                "save with np.savez (not savez_compressed) or use a folder of .npy files")
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise DataError(f"--data {path}: damaged zip entry for {key}")
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            f.seek(start)
            version = npformat.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npformat.read_array_header_1_0(f)
            else:  # 2.0 and 3.0 share the layout this reader needs
                shape, fortran, dtype = npformat.read_array_header_2_0(f)
            offset = f.tell()
    except DataError:
        raise
    except zipfile.BadZipFile as e:
        raise DataError(f"--data {path}: not a valid .npz file ({e})") from None
    except (ValueError, EOFError) as e:
        raise DataError(f"--data {path}: {key} is not a valid array ({e})") from None
    except OSError as e:
        raise DataError(f"--data {path}: cannot read {key} ({e.strerror or e})") from None
    if dtype.hasobject:
        raise DataError(f"--data {path}: {key} holds Python objects; only numeric arrays are supported")
    # A member shorter than its header says would map the bytes after it (the next member, the zip's
    # directory) as data; numpy.load refuses such a file, and so do we.
    needed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    stored = start + info.compress_size - offset
    if needed > stored:
        raise DataError(f"--data {path}: member {key}.npy is damaged: its header promises shape {shape} "
                        f"({needed} bytes of {dtype}) but the member holds only {max(stored, 0)} bytes of data")
    try:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    except (ValueError, OSError) as e:
        raise DataError(f"--data {path}: cannot map {key} ({e})") from None


def open_source(dataset: str, data_path: str | None = None, samples: int = 10000, features: int = 32,
                classes: int = 10, seed: int = 0, separation: float = 1.0) -> Source:
    """The source named by the CLI's ``--dataset`` / ``--data``; raises DataError naming the problem."""
    if data_path:
        return ArraySource(data_path)
    if dataset == "digits":
        return DigitsSource()
    if dataset == "synthetic":
        return SyntheticSource(samples, features, classes, seed, separation)
    raise DataError(f"unknown dataset {dataset!r}; choose digits or synthetic, or give --data PATH")


# ---------------------------------------------------------------- one rank's view

@dataclass
class ShardedData:
    """Rank ``rank`` of ``size``: its test rows, and its train rows in each epoch's order."""

    source: Source
    rank: int
    size: int
    seed: int
    test_fraction: float = 0.2
    shuffle: str = "local"

    def __post_init__(self) -> None:
        if self.shuffle not in ("local", "global"):
            raise DataError(f"--shuffle must be local or global, got {self.shuffle!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise DataError(f"--test-fraction must be between 0 and 1, got {self.test_fraction}")
        lo, hi = block(self.source.n, self.size, self.rank)
        rows = np.arange(lo, hi, dtype=np.int64)
        is_test = is_test_row(rows, self.test_fraction)
        self.test_rows, self.own_train_rows = rows[is_test], rows[~is_test]
        self._cached: tuple[np.ndarray, np.ndarray] | None = None

    def test_set(self) -> tuple[np.ndarray, np.ndarray]:
        return self.source.read(self.test_rows)

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """This rank's train rows for ``epoch``, in training order."""
        if self.shuffle == "local":
            rng = np.random.default_rng([self.seed, epoch, self.rank, 0x10CA1])
            return self.own_train_rows[rng.permutation(len(self.own_train_rows))]
        lo, hi = block(self.source.n, self.size, self.rank)
        rows = feistel_permutation(np.arange(lo, hi), self.source.n, int(_hash(self.seed, epoch, 0x6B)))
        return rows[~is_test_row(rows, self.test_fraction)]

    def epoch_data(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples and labels of ``epoch_rows(epoch)``, in that order (local order: read once, then permuted)."""
        rows = self.epoch_rows(epoch)
        if self.shuffle == "global":
            return self.source.read(rows)
        if self._cached is None:
            self._cached = self.source.read(self.own_train_rows)
        where = np.searchsorted(self.own_train_rows, rows)
        return self._cached[0][where], self._cached[1][where]


def batch_indices(count: int, batch_size: int, steps: int) -> np.ndarray:
    """``steps`` batches of ``batch_size`` positions into ``count`` items, wrapping around at the end.

    Every rank runs the same number of steps per epoch (the largest shard's
    ``ceil(count / batch_size)``); a rank with fewer rows, or a partial last
    batch, starts again from the top of its own epoch order.
    """
    if count <= 0:
        raise DataError("this rank has no training rows")
    return (np.arange(steps * batch_size) % count).reshape(steps, batch_size)
