"""calibrate-model: fitting mpiml.plan's cost model where the job runs, and saving it beside auto's table.

No timing is asserted here (the machine is shared): that the fit is usable, the same on every rank, and
lands where plan and auto read it. How close its predictions come is checked on the emulated cluster,
where the link, not the CPU, decides (tests/test_cluster.py).
"""

import json
import math

import pytest
from mpi4py import MPI

from mpiml import calibrate, plan
from mpiml.collectives import auto

QUICK = (8, 64 << 10, 256 << 10)


@pytest.fixture
def quick(monkeypatch):
    if MPI.COMM_WORLD.size > 2:
        pytest.skip("2 ranks cover the fit (nothing in it depends on the rank count); more only oversubscribe it")
    monkeypatch.setattr(calibrate, "PING_SIZES", QUICK)
    monkeypatch.setattr(calibrate, "OVERHEAD_SIZES", (4 << 10,))


@pytest.mark.mpi(min_size=2)
def test_fit_is_usable_and_the_same_everywhere(world, quick):
    m, layout, notes = calibrate.fit_machine(world)
    assert layout.size == world.size
    values = m.to_json()
    assert all(math.isfinite(v) and v >= 0 for v in values.values() if isinstance(v, float)), values
    assert m.gamma > 0 and m.beta_local > 0 and m.alpha_local > 0
    everyone = world.allgather(json.dumps(values, sort_keys=True))
    assert all(e == everyone[0] for e in everyone)
    assert plan.allreduce_time(1 << 20, "ring", plan.Layout(layout.hosts, layout.per_host), m) > 0


@pytest.mark.mpi(min_size=2)
def test_model_saved_beside_autos_table_and_found_by_plan(world, quick, tmp_path_factory, monkeypatch):
    path = world.bcast(str(tmp_path_factory.mktemp("cal") / "calibration.json") if world.rank == 0 else None)
    if world.rank == 0:
        with open(path, "w") as f:
            json.dump({"tables": {"3": [[None, "ring"]]}}, f)
    world.Barrier()
    monkeypatch.setenv("MPIML_CALIBRATION", path)
    from mpiml import bench
    assert bench.main(["calibrate-model"]) == 0
    world.Barrier()
    with open(path) as f:
        saved = json.load(f)
    key = next(iter(saved["models"]))
    assert saved["tables"]["3"] == [[None, "ring"]]  # auto's tables are kept
    m, source = plan.load_machine(path, key)
    assert path in source and m == plan.Machine.from_json(saved["models"][key])
    assert "x" not in key or world.size > 1
    rows, how = auto.decide(1, 16, 16)  # a one-host layout with no table of its own: predicted
    if "x" not in key:
        assert how == "model" and rows


@pytest.mark.mpi(min_size=1)
def test_one_rank_is_refused(quick):
    if MPI.COMM_WORLD.size != 1:
        pytest.skip("one rank only")
    with pytest.raises(ValueError, match="at least 2 ranks"):
        calibrate.fit_machine(MPI.COMM_SELF)
