"""Bad options and bad data refused up front by ``mpiml.train.run`` (in this process, one rank), with one clear
message (``UserError``: ``error:`` and exit status 2 from the command line), before any training starts."""

import os

import numpy as np
import pytest

from mpiml.models import build_model, parameter_count
from mpiml.runtime import UserError
from mpiml.train import Config, run

HUGE = 10 ** 11  # more memory than any host has, as hidden units or classes


@pytest.mark.parametrize("overrides, message", [
    (dict(seed=-1), r"--seed must be an integer from 0 to 18446744073709551615, got -1$"),
    (dict(seed=10 ** 23), r"--seed must be an integer from 0"),
    (dict(straggler="0:nan"), r"--straggler must be RANK:FACTOR with FACTOR >= 1 \(and finite\), got '0:nan'"),
    (dict(straggler="0:inf"), r"--straggler must be RANK:FACTOR with FACTOR >= 1 \(and finite\), got '0:inf'"),
    (dict(straggler="1:2"), r"--straggler: there is no rank 1 in a job of 1 rank$"),
    (dict(fault="hang:1:5"), r"--fault: there is no rank 1 in a job of 1 rank$"),
    (dict(fault="hang:0:-1"), r"--fault must be KIND:RANK:STEP .* non-negative integers, got 'hang:0:-1'"),
    (dict(fault="hang:0:46"), r"--fault hang:0:46: step 46 is past the run's last step, 45 \(1 epochs of 46 steps\)"),
    (dict(hidden=""), r"--hidden needs at least one layer size for --model mlp"),
    (dict(data=""), r"--data needs a path"),
    (dict(classes=5), r"--classes 5: the digits data set has 10 classes"),
    (dict(batch_size=10 ** 9), r"--batch-size 1000000000 is larger than the 1457 training rows of rank 0: "
                               r"use --batch-size 1457 or less"),
    (dict(threads=100000), r"--threads 100000: this host has \d+ CPUs; use at most \d+"),
    (dict(hidden=str(HUGE)), r"the model \(--model mlp, --hidden 100000000000; 64 features, 10 classes\) has "
                             r"7,500,000,000,010 parameters; .* needs about .* TB of memory per rank, more than"),
    (dict(dataset="synthetic", classes=HUGE), r"--dataset synthetic with --classes 100000000000 and --features 32 "
                                              r"needs about .* of memory per rank, more than"),
    (dict(restart_if_damaged=True), r"--restart-if-damaged only applies with --resume"),
    (dict(dataset="synthetic", samples=20, test_fraction=0.01), r"no test rows: with --test-fraction 0.01, none of "
                                                                r"the 20 rows is a test row"),
])
def test_bad_options_are_refused_before_training(overrides, message, capsys):
    with pytest.raises(UserError, match=message):
        run(Config(progress=False, epochs=1, **overrides))
    assert "epoch" not in capsys.readouterr().out  # refused before the first epoch


@pytest.mark.parametrize("shape, hidden", [((64,), (128,)), ((1, 8, 8), (32, 16)), ((5,), ())])
@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])
def test_parameter_count_matches_the_model_built(name, shape, hidden):
    if name == "cnn" and shape == (5,):
        return
    model = build_model(name, shape, 7, hidden)
    assert parameter_count(name, shape, 7, hidden) == sum(p.numel() for p in model.parameters())


def save_data(tmp_path, x, y, name="d.npz"):
    path = str(tmp_path / name)
    np.savez(path, X=x, y=y)
    return path


def features(rows=60):
    return np.random.default_rng(0).standard_normal((rows, 4)).astype(np.float32)


@pytest.mark.parametrize("where", ["train", "test"])
def test_nan_in_the_data_names_the_file_and_row(tmp_path, where):
    from mpiml.data import is_test_row
    x, y = features(), np.arange(60) % 3
    row = int(np.flatnonzero(is_test_row(np.arange(60), 0.2) == (where == "test"))[0])
    x[row, 2] = np.nan
    path = save_data(tmp_path, x, y)
    with pytest.raises(UserError, match=rf"--data {path}: X row {row} holds NaN or Inf"):
        run(Config(progress=False, epochs=1, data=path, batch_size=8))


@pytest.mark.parametrize("label, shown", [(10 ** 9, "1000000000"), (2 ** 64 - 1, "18446744073709551615")])
def test_a_huge_label_is_reported_as_itself_and_refused_for_memory(tmp_path, label, shown):
    y = (np.arange(60) % 3).astype(np.uint64)
    y[7] = label
    path = save_data(tmp_path, features(), y)
    with pytest.raises(UserError, match=rf"\d+ classes, from the largest label, {shown}\) has .* parameters;"):
        run(Config(progress=False, epochs=1, data=path, batch_size=8))


def test_a_label_beyond_classes_names_the_exact_uint64_value(tmp_path):
    y = (np.arange(60) % 3).astype(np.uint64)
    y[7] = 2 ** 63 + 5
    path = save_data(tmp_path, features(), y)
    with pytest.raises(UserError, match=rf"label {2 ** 63 + 5} is out of range for --classes 3"):
        run(Config(progress=False, epochs=1, data=path, batch_size=8, classes=3))


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), "X and y hold no rows"),
    (np.zeros((60, 0), np.float32), np.arange(60) % 3, r"X has no features \(shape \(60, 0\)\)"),
])
def test_empty_data_is_refused_by_name(tmp_path, x, y, message):
    path = save_data(tmp_path, x, y)
    with pytest.raises(UserError, match=message):
        run(Config(progress=False, epochs=1, data=path, batch_size=8))


def test_good_data_file_still_trains(tmp_path):
    path = save_data(tmp_path, features(), (np.arange(60) % 3).astype(np.uint64))
    assert run(Config(progress=False, epochs=1, data=path, batch_size=8)) == 0



@pytest.mark.parametrize("where, message", [
    ("dir", r"--timeline {tmp} is a directory; give a file name, e.g. {tmp}/trace.json"),
    ("under a file", r"--timeline {tmp}/f/trace.json: {tmp}/f is a file, not a directory"),
])
def test_timeline_path_is_checked_before_training(tmp_path, capsys, where, message):
    (tmp_path / "f").write_text("")
    path = str(tmp_path) if where == "dir" else str(tmp_path / "f" / "trace.json")
    with pytest.raises(UserError, match=message.format(tmp=tmp_path)):
        run(Config(progress=False, epochs=1, timeline=path))
    assert "epoch" not in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["f"]  # nothing left behind


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_timeline_on_a_full_disk_only_warns(capfd):
    assert run(Config(progress=False, epochs=1, timeline="/dev/full")) == 0
    captured = capfd.readouterr()
    assert "final: test accuracy" in captured.out
    assert captured.err.count("warning: timeline /dev/full:") == 1
