"""mpiml.torch's error cases, objects, barrier, basics, shutdown, idle cost and algorithms (Horovod test style).

Inputs and references come from test_horovod_api's helpers: random values
that differ by rank, and expected results computed from every rank's input.
"""

import itertools

import pytest
import torch
from mpi4py import MPI
from test_horovod_api import everyone, rank_tensor, reference

import mpiml.torch as hvd
from mpiml.torch import ops


@pytest.fixture(autouse=True)
def engine():
    hvd.init()
    ops._counter = itertools.count(MPI.COMM_WORLD.allreduce(next(ops._counter), op=MPI.MAX))


# ---------------------------------------------------------------- errors


@pytest.mark.mpi(min_size=2)
def test_mismatched_shapes_raise_runtime_error_naming_both():
    rank = hvd.rank()
    both = r"rank 0 has shape \[17, 17, 17\], ranks? 1[\d,]* ha(s|ve) shape \[18, 18, 18\]"
    with pytest.raises(RuntimeError, match=both):
        hvd.allreduce(torch.zeros([17 + min(rank, 1)] * 3))
    shape = [17, 23 * 57] if rank == 0 else [17, 23, 57]  # same number of elements, different dimensions
    with pytest.raises(hvd.HorovodInternalError, match=r"\[17, 1311\].*\[17, 23, 57\]"):
        hvd.allreduce(torch.zeros(shape))
    with pytest.raises(RuntimeError, match="Mismatched allgather tensor shapes"):
        hvd.allgather(torch.zeros(17, 10 * (rank + 1), 17))
    with pytest.raises(RuntimeError, match="Mismatched broadcast tensor shapes"):
        hvd.broadcast(torch.zeros(3 + min(rank, 1)), 0)
    with pytest.raises(RuntimeError, match="Mismatched alltoall tensor shapes"):
        hvd.alltoall(torch.zeros(2 * hvd.size(), 1 + rank))
    hvd.allreduce(torch.ones(3), name="after_errors")  # the engine carries on


@pytest.mark.mpi(min_size=2)
def test_mismatched_dtypes_ops_and_roots_raise():
    rank = hvd.rank()
    with pytest.raises(RuntimeError, match=r"ranks? 0[\d,]* ha(s|ve) data type torch.int32, ranks? 1[\d,]* ha(s|ve) "
                                           "data type torch.float32"):
        hvd.allreduce(torch.zeros(17, 17, dtype=torch.int32 if rank % 2 == 0 else torch.float32))
    with pytest.raises(RuntimeError, match="data type"):
        hvd.allgather(torch.zeros(4, dtype=torch.int32 if rank % 2 == 0 else torch.float32))
    with pytest.raises(RuntimeError, match="Mismatched broadcast root ranks"):
        hvd.broadcast(torch.zeros(3), rank)
    with pytest.raises(RuntimeError, match="op"):
        hvd.allreduce(torch.zeros(3), op=hvd.Sum if rank == 0 else hvd.Max)
    with pytest.raises(RuntimeError, match="Invalid root rank"):
        hvd.broadcast(torch.zeros(3), hvd.size())
    with pytest.raises(RuntimeError, match="group sizes"):
        hvd.grouped_allreduce([torch.zeros(2)] * (1 + min(rank, 1)), name="groups")


@pytest.mark.mpi(min_size=1)
def test_duplicate_pending_name_raises_value_error():
    t = rank_tensor(hvd.rank(), [3], torch.float32, seed=1400)
    with hvd.basics.engine()._cond:  # the engine cannot take "dup" yet, so it is surely still pending
        handle = hvd.allreduce_async(t, name="dup", op=hvd.Sum)
        with pytest.raises(ValueError, match="same name"):
            hvd.allreduce_async(t, name="dup")
    expected = reference(everyone([3], torch.float32, seed=1400), hvd.Sum, torch.float32)
    torch.testing.assert_close(hvd.synchronize(handle), expected)
    hvd.synchronize(hvd.allreduce_async(t, name="dup"))  # the name is free again


@pytest.mark.mpi(min_size=1)
def test_bad_arguments_raise_locally():
    with pytest.raises(ValueError, match="contiguous"):
        hvd.allreduce(torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="not supported"):
        hvd.allreduce(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="Adasum"):
        hvd.allreduce(torch.zeros(3), op=hvd.Adasum)
    with pytest.raises(ValueError, match="supersedes"):
        hvd.allreduce(torch.zeros(3), average=True, op=hvd.Sum)
    if hvd.size() > 1:
        with pytest.raises(ValueError, match="not divide"):
            hvd.alltoall(torch.zeros(hvd.size() + 1))
    with pytest.raises(ValueError, match="more than the first dimension"):
        hvd.alltoall(torch.zeros(hvd.size() - 1), splits=torch.ones(hvd.size(), dtype=torch.int32))
    with pytest.raises(ValueError, match="integers"):
        hvd.alltoall(torch.zeros(hvd.size()), splits=torch.ones(hvd.size(), dtype=torch.float32))
    with pytest.raises(ValueError, match="at least one dimension"):
        hvd.allgather(torch.tensor(1.0))
    with pytest.raises(ValueError, match="process sets"):
        hvd.allreduce(torch.zeros(3), process_set=hvd.ProcessSet())
    with pytest.raises(TypeError):
        hvd.allreduce([1, 2, 3])


# ---------------------------------------------------------------- objects, barrier, basics


@pytest.mark.mpi(min_size=1)
def test_broadcast_object_and_allgather_object():
    rank = hvd.rank()
    obj = {"rank": rank, "data": torch.randn(3, generator=torch.Generator().manual_seed(rank)).tolist(), 0: [1, 2]}
    root = hvd.size() - 1
    got = hvd.broadcast_object(obj, root_rank=root)
    assert got["rank"] == root and got[0] == [1, 2]
    gathered = hvd.allgather_object({"r": rank, "x": "y" * rank})
    assert gathered == [{"r": r, "x": "y" * r} for r in range(hvd.size())]


@pytest.mark.mpi(min_size=1)
def test_barrier_waits_for_every_rank(tmp_path_factory):
    comm = MPI.COMM_WORLD
    path = comm.bcast(str(tmp_path_factory.mktemp("barrier") / "flag") if comm.rank == 0 else None)
    if comm.rank == 0:
        import time
        time.sleep(0.3)
        open(path, "w").close()
    hvd.barrier()
    import os
    assert os.path.exists(path)


@pytest.mark.mpi(min_size=1)
def test_ranks_sizes_and_flags():
    comm = MPI.COMM_WORLD
    assert (hvd.rank(), hvd.size()) == (comm.rank, comm.size)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    assert (hvd.local_rank(), hvd.local_size()) == (local.rank, local.size)
    assert hvd.cross_size() * hvd.local_size() == hvd.size() or not hvd.is_homogeneous()
    assert hvd.is_initialized() and hvd.mpi_enabled() and not hvd.gloo_enabled() and hvd.mpi_threads_supported()
    assert (hvd.Average, hvd.Sum, hvd.Adasum, hvd.Min, hvd.Max, hvd.Product) == (0, 1, 2, 3, 4, 5)


@pytest.mark.mpi(min_size=1)
def test_shutdown_then_init_again():
    hvd.shutdown()
    assert not hvd.is_initialized()
    with pytest.raises(ValueError, match="not been initialized"):
        hvd.allreduce(torch.ones(2))
    hvd.init()
    assert torch.equal(hvd.allreduce(torch.ones(2), op=hvd.Sum), torch.full((2,), float(hvd.size())))


@pytest.mark.mpi(min_size=1)
def test_idle_engine_does_not_burn_a_core():
    import resource
    import time
    hvd.allreduce(torch.ones(1))
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    time.sleep(1.0)
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert cpu / wall < 0.25, f"an idle rank used {100 * cpu / wall:.0f}% of a core"


@pytest.mark.mpi(min_size=1)
def test_every_mpiml_algorithm_and_bad_settings(monkeypatch):
    from mpiml import collectives
    size, rank = hvd.size(), hvd.rank()
    try:
        for i, algorithm in enumerate(collectives.ALGORITHMS):
            monkeypatch.setenv("MPIML_ALGORITHM", algorithm)
            hvd.shutdown()
            hvd.init()
            assert hvd.basics.engine().algorithm == algorithm
            inputs = everyone([5, 3], torch.float64, seed=1500 + i)
            handles = [hvd.allreduce_async(inputs[rank] * k, op=hvd.Sum) for k in (1, 2)]
            for k, h in zip((1, 2), handles, strict=True):
                torch.testing.assert_close(hvd.synchronize(h), reference(inputs, hvd.Sum, torch.float64) * k)
            assert torch.equal(hvd.allgather(inputs[rank]), torch.cat(inputs))
            assert torch.equal(hvd.broadcast(inputs[rank], size - 1), inputs[size - 1])
            rows = hvd.reducescatter(torch.cat([inputs[rank]] * size), op=hvd.Sum)
            torch.testing.assert_close(rows, reference(inputs, hvd.Sum, torch.float64))
        for name, value in (("MPIML_ALGORITHM", "rnig"), ("HOROVOD_FUSION_THRESHOLD", "lots"),
                            ("HOROVOD_CYCLE_TIME", "-1"), ("HOROVOD_CYCLE_TIME", "inf"),
                            ("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "nan")):
            monkeypatch.setenv("MPIML_ALGORITHM", "ring")
            monkeypatch.setenv(name, value)
            hvd.shutdown()
            with pytest.raises(ValueError, match=name):
                hvd.basics.settings()
            with pytest.raises(SystemExit) as stop:  # every rank stops as for a bad command line
                hvd.init()
            assert stop.value.code == 2 and not hvd.is_initialized()
            monkeypatch.delenv(name)
    finally:
        monkeypatch.undo()
        hvd.shutdown()
        hvd.init()


@pytest.mark.mpi(min_size=2)
def test_shutdown_without_a_timeline_makes_no_collective_call(monkeypatch):
    # The final trace merge is the only collective at shutdown; when no rank records a trace, a rank that
    # has finished must not be needed by a peer still inside it (a stranded engine never stops).
    from mpiml.timeline import Timeline
    comms = []
    close = Timeline.close
    monkeypatch.setattr(Timeline, "close", lambda self, comm=None: comms.append(comm) or close(self, comm))
    hvd.shutdown()
    monkeypatch.undo()
    hvd.init()
    assert comms == [None]
