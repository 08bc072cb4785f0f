import os

import numpy as np
import pytest

from mpiml.data import (
    DIGITS_ROWS,
    ArraySource,
    DataError,
    DigitsSource,
    ShardedData,
    SyntheticSource,
    batch_indices,
    block,
    feistel_permutation,
    is_test_row,
    open_source,
)


def test_blocks_partition_rows():
    for n, k in [(10, 3), (1797, 4), (5, 8), (0, 2)]:
        bounds = [block(n, k, r) for r in range(k)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(bounds[r][1] == bounds[r + 1][0] for r in range(k - 1))
        assert max(h - lo for lo, h in bounds) - min(h - lo for lo, h in bounds) <= 1


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_feistel_is_a_permutation(n):
    perm = feistel_permutation(np.arange(n), n, key=12345)
    assert sorted(perm.tolist()) == list(range(n))
    if n > 16:
        assert not np.array_equal(perm, np.arange(n))
        assert not np.array_equal(perm, feistel_permutation(np.arange(n), n, key=54321))


def test_feistel_slices_agree_with_whole():
    n = 5000
    whole = feistel_permutation(np.arange(n), n, key=7)
    assert np.array_equal(feistel_permutation(np.arange(1200, 2600), n, key=7), whole[1200:2600])


def test_split_is_fixed_and_about_right():
    rows = np.arange(100000)
    mask = is_test_row(rows, 0.2)
    assert 0.19 < mask.mean() < 0.21
    assert np.array_equal(mask[5000:6000], is_test_row(np.arange(5000, 6000), 0.2))


def test_digits_reads_only_requested_rows():
    src = DigitsSource()
    x, y = src.read(np.array([5, 0, 1796, 5]))
    assert x.shape == (4, 1, 8, 8) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.array_equal(x[0], x[3]) and 0 <= x.min() and x.max() <= 1
    from sklearn.datasets import load_digits
    ref = load_digits()
    assert np.array_equal(y, ref.target[[5, 0, 1796, 5]])
    assert np.allclose(x.reshape(4, 64), ref.data[[5, 0, 1796, 5]] / 16)


def test_synthetic_rows_are_pure_functions_of_index():
    src = SyntheticSource(samples=10**9, features=8, classes=5, seed=3)
    x1, y1 = src.read(np.array([10, 999_999_999, 42]))
    x2, y2 = src.read(np.array([42, 10]))
    assert np.array_equal(x1[[2, 0]], x2) and np.array_equal(y1[[2, 0]], y2)
    assert x1.shape == (3, 8) and set(y1.tolist()) <= set(range(5))
    other = SyntheticSource(samples=100, features=8, classes=5, seed=4)
    assert not np.array_equal(other.read(np.array([10]))[0], x1[:1])


def test_synthetic_is_learnable_roughly_gaussian():
    src = SyntheticSource(samples=20000, features=16, classes=4, seed=0)
    x, y = src.read(np.arange(20000))
    noise = x - src.centres[y]
    assert abs(noise.mean()) < 0.02 and 0.97 < noise.std() < 1.03
    # nearest-centre classification does much better than chance
    d = ((x[:, None, :] - src.centres[None]) ** 2).sum(-1)
    assert (d.argmin(1) == y).mean() > 0.6


@pytest.mark.parametrize("shuffle", ["local", "global"])
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_shards_cover_train_set_once_per_epoch(shuffle, k):
    src = SyntheticSource(samples=1001, features=4, classes=3, seed=1)
    shards = [ShardedData(src, r, k, seed=9, shuffle=shuffle) for r in range(k)]
    tests = np.concatenate([s.test_rows for s in shards])
    for epoch in (0, 1):
        train = np.concatenate([s.epoch_rows(epoch) for s in shards])
        assert len(np.intersect1d(train, tests)) == 0
        assert sorted(np.concatenate([train, tests]).tolist()) == list(range(1001))
    assert sorted(tests.tolist()) == np.flatnonzero(is_test_row(np.arange(1001), 0.2)).tolist()
    # orders change from epoch to epoch
    assert not np.array_equal(shards[0].epoch_rows(0), shards[0].epoch_rows(1))


def test_epoch_data_matches_rows():
    src = SyntheticSource(samples=300, features=3, classes=3, seed=2)
    for shuffle in ("local", "global"):
        shard = ShardedData(src, 1, 3, seed=5, shuffle=shuffle)
        x, y = shard.epoch_data(4)
        rx, ry = src.read(shard.epoch_rows(4))
        assert np.array_equal(x, rx) and np.array_equal(y, ry)


def test_batches_wrap_around():
    b = batch_indices(5, 2, 4)
    assert b.tolist() == [[0, 1], [2, 3], [4, 0], [1, 2]]
    with pytest.raises(DataError, match="no training rows"):
        batch_indices(0, 2, 1)


@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    return tmp_path, x, y


def test_npz_is_memory_mapped(arrays):
    tmp, x, y = arrays
    path = str(tmp / "d.npz")
    np.savez(path, X=x, y=y)
    src = open_source("ignored", path)
    assert isinstance(src.x, np.memmap) and src.n == 50 and src.sample_shape == (6,)
    rx, ry = src.read(np.array([7, 3, 49]))
    assert np.array_equal(rx, x[[7, 3, 49]]) and np.array_equal(ry, y[[7, 3, 49]])


def test_npy_folder(arrays):
    tmp, x, y = arrays
    np.save(tmp / "X.npy", x)
    np.save(tmp / "y.npy", y)
    src = open_source("ignored", str(tmp))
    assert np.array_equal(src.read(np.arange(50))[0], x)


@pytest.mark.parametrize("case, match", [
    ("missing", "no such file"),
    ("compressed", "compressed and cannot be memory-mapped"),
    ("no_y", "no array named 'y'"),
    ("rows", "X has 50 rows but y has 49"),
    ("labels_float", "integer class labels"),
    ("y_2d", "y must be 1-D"),
    ("x_1d", "one row per sample"),
    ("not_zip", "not a valid .npz"),
    ("folder_without_y", "has no y.npy"),
    ("other_ext", "expected a .npz file or a folder"),
])
def test_bad_files(arrays, case, match):
    tmp, x, y = arrays
    path = str(tmp / "d.npz")
    if case == "compressed":
        np.savez_compressed(path, X=x, y=y)
    elif case == "no_y":
        np.savez(path, X=x)
    elif case == "rows":
        np.savez(path, X=x, y=y[:49])
    elif case == "labels_float":
        np.savez(path, X=x, y=y.astype(np.float32))
    elif case == "y_2d":
        np.savez(path, X=x, y=y.reshape(25, 2))
    elif case == "x_1d":
        np.savez(path, X=x[:, 0], y=y)
    elif case == "not_zip":
        with open(path, "w") as f:
            f.write("hello")
    elif case == "folder_without_y":
        path = str(tmp / "folder")
        os.mkdir(path)
        np.save(os.path.join(path, "X.npy"), x)
    elif case == "other_ext":
        path = str(tmp / "d.csv")
        open(path, "w").close()
    elif case == "missing":
        path = str(tmp / "nope.npz")
    with pytest.raises(DataError, match=match):
        ArraySource(path)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        open_source("mnist")


def test_digits_row_count():
    assert DigitsSource().n == DIGITS_ROWS
