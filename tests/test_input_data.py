"""Bad data files named clearly: damaged .npz members, empty or featureless arrays, huge labels, NaN rows."""

import io
import os
import zipfile

import numpy as np
import numpy.lib.format as npformat
import pytest

from mpiml.data import ArraySource, DataError


def npy_bytes(array, claim_shape=None):
    """``array`` as .npy bytes; ``claim_shape`` writes a header promising another shape (a damaged member)."""
    buf = io.BytesIO()
    header = npformat.header_data_from_array_1_0(array)
    if claim_shape is not None:
        header["shape"] = claim_shape
    npformat.write_array_header_1_0(buf, header)
    buf.write(np.ascontiguousarray(array).tobytes())
    return buf.getvalue()


def write_npz(path, members):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, blob in members.items():
            z.writestr(name, blob)


def test_member_shorter_than_its_header_is_refused(tmp_path):
    path = str(tmp_path / "short.npz")
    x = np.ones((10, 3), np.float32)
    write_npz(path, {"X.npy": npy_bytes(x, claim_shape=(100, 3)), "y.npy": npy_bytes(np.zeros(100, np.int64))})
    with pytest.raises(ValueError, match="EOF"):  # numpy itself refuses this file
        np.load(path)["X"]
    with pytest.raises(DataError, match=r"short\.npz: member X\.npy is damaged: its header promises shape "
                                        r"\(100, 3\)"):
        ArraySource(path)


def test_member_reaching_past_the_end_of_the_file_is_a_data_error(tmp_path):
    path = str(tmp_path / "past.npz")
    blob = npy_bytes(np.ones((10, 3), np.float32), claim_shape=(10 ** 9, 3))
    write_npz(path, {"y.npy": npy_bytes(np.zeros(10, np.int64)), "X.npy": blob})
    with pytest.raises(DataError, match=r"past\.npz: member X\.npy is damaged"):
        ArraySource(path)


def test_missing_member_is_named_once(tmp_path):
    path = str(tmp_path / "no_y.npz")
    np.savez(path, X=np.ones((4, 2), np.float32))
    with pytest.raises(DataError) as info:
        ArraySource(path)
    assert str(info.value) == f"--data {path}: no array named 'y' in the file (it has X)"


def test_symlink_loop_is_not_no_such_file(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    os.symlink(b, a)
    os.symlink(a, b)
    with pytest.raises(DataError, match="too many levels of symbolic links"):
        ArraySource(str(a))


def test_empty_arrays_are_refused(tmp_path):
    path = str(tmp_path / "empty.npz")
    np.savez(path, X=np.zeros((0, 3), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(DataError, match="X and y hold no rows"):
        ArraySource(path)


def test_zero_feature_x_is_refused(tmp_path):
    path = str(tmp_path / "flat.npz")
    np.savez(path, X=np.zeros((5, 0), np.float32), y=np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"X has no features \(shape \(5, 0\)\)"):
        ArraySource(path)


def test_scan_reports_exact_label_range_of_uint64_labels(tmp_path):
    path = str(tmp_path / "u64.npz")
    y = np.array([0, 1, 2**64 - 1, 3], np.uint64)
    np.savez(path, X=np.zeros((4, 2), np.float32), y=y)
    assert ArraySource(path).scan(0, 4) == (0, 2**64 - 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e300])
def test_scan_names_the_first_non_finite_row(tmp_path, bad):
    path = str(tmp_path / "nan.npz")
    x = np.zeros((50, 3), np.float64)
    x[37, 1] = bad
    np.savez(path, X=x, y=np.zeros(50, np.int64))
    src = ArraySource(path)
    assert src.scan(0, 37, chunk_bytes=64) == (0, 0)  # rows before it are fine, chunk by chunk
    with pytest.raises(DataError, match=r"nan\.npz: X row 37 holds NaN or Inf"):
        src.scan(0, 50, chunk_bytes=64)


def test_symlink_loop_inside_a_folder_is_named(tmp_path):
    np.save(tmp_path / "X.npy", np.zeros((4, 2), np.float32))
    os.symlink(tmp_path / "y.npy", tmp_path / "y.npy")
    with pytest.raises(DataError, match=r"y\.npy: not a readable \.npy file .*Too many levels of symbolic links"):
        ArraySource(str(tmp_path))
