"""The coordinator's rules on their own (no MPI traffic): readiness by name, checks, order, fusion, join, stalls."""

import pytest

from mpiml.torch.negotiation import Coordinator, Message, Meta, check


def ar(name, shape=(4,), dtype="float32", op=1, **kw):
    return Meta(f"allreduce.{name}", "allreduce", dtype, (tuple(shape),), op=op, **kw)


def send(coord, rank, *metas, joined=False, shutdown=False):
    coord.receive(rank, Message(list(metas), joined, shutdown))


@pytest.mark.mpi(min_size=1)
def test_ready_only_when_every_rank_submitted_whatever_the_order():
    c = Coordinator(3, fusion_threshold=0)
    send(c, 0, ar("a"), ar("b"))
    send(c, 1, ar("b"))
    send(c, 2, ar("b"), ar("a"))
    assert [r.names for r in c.plan()] == [("allreduce.b",)]
    send(c, 1, ar("a"))
    assert [r.names for r in c.plan()] == [("allreduce.a",)] and c.pending == 0 and c.plan() == []


@pytest.mark.mpi(min_size=1)
def test_fusion_respects_threshold_keys_and_order():
    c = Coordinator(2, fusion_threshold=40)  # bytes: ten float32
    metas = [ar("a", (4,)), ar("b", (4,)), ar("c", (4,)), ar("d", (2,), dtype="float64"), ar("e", (4,), op=0),
             Meta("allgather.g", "allgather", "float32", ((3, 2),)), ar("f", (1,))]
    for rank in (0, 1):
        send(c, rank, *metas)
    plan = c.plan()
    assert [(r.kind, r.names) for r in plan] == [
        ("allreduce", ("allreduce.a", "allreduce.b")), ("allreduce", ("allreduce.c", "allreduce.f")),
        ("allreduce", ("allreduce.d",)), ("allreduce", ("allreduce.e",)), ("allgather", ("allgather.g",))]
    assert plan[-1].extra == ((3, 3),)  # every rank's first dimension


@pytest.mark.mpi(min_size=1)
def test_checks_name_each_ranks_value():
    assert check("x", {0: ar("x", (17, 17)), 1: ar("x", (17, 17))}, 2) is None
    shapes = check("x", {0: ar("x", (17, 17)), 1: ar("x", (18, 18)), 2: ar("x", (18, 18))}, 3)
    assert shapes == "Mismatched allreduce tensor shapes for 'x': rank 0 has shape [17, 17], ranks 1,2 have shape " \
                     "[18, 18]."
    assert "rank 1 has data type torch.int32" in check("x", {0: ar("x"), 1: ar("x", dtype="int32")}, 2)
    assert "rank 1 has op Max" in check("x", {0: ar("x"), 1: ar("x", op=4)}, 2)
    assert "prescale_factor" in check("x", {0: ar("x"), 1: ar("x", prescale=2.0)}, 2)
    bc = {r: Meta("b", "broadcast", "float32", ((3,),), root=r) for r in range(2)}
    assert "root ranks" in check("b", bc, 2)
    assert "Invalid root rank 5" in check("b", {0: Meta("b", "broadcast", "float32", ((3,),), root=5)}, 1)
    gather = {0: Meta("g", "allgather", "float32", ((3, 2),)), 1: Meta("g", "allgather", "float32", ((5, 2),))}
    assert check("g", gather, 2) is None
    gather[1] = Meta("g", "allgather", "float32", ((5, 3),))
    assert "every dimension but the first" in check("g", gather, 2)


@pytest.mark.mpi(min_size=1)
def test_errors_join_and_shutdown():
    c = Coordinator(3, fusion_threshold=1 << 20)
    send(c, 0, joined=True)
    send(c, 1, ar("x"), Meta("allgather.g", "allgather", "float32", ((1,),)))
    send(c, 2, ar("x"), Meta("allgather.g", "allgather", "float32", ((1,),)))
    plan = c.plan()
    assert plan[0].kind == "error" and "rank 0 already called join()" in plan[0].error
    assert plan[1].names == ("allreduce.x",) and len(plan) == 2  # the joined rank contributes its share
    send(c, 1, joined=True)  # the engine passes messages in rank order: the highest rank of a cycle joined last
    send(c, 2, joined=True)
    assert [(r.kind, r.extra) for r in c.plan()] == [("join", 2)]
    assert not c.joined
    send(c, 1, shutdown=True)
    assert [r.kind for r in c.plan()] == ["shutdown"]


@pytest.mark.mpi(min_size=1)
def test_stall_warning_names_the_missing_ranks():
    now, warnings = [0.0], []
    c = Coordinator(3, fusion_threshold=0, stall_seconds=60, clock=lambda: now[0], warn=warnings.append)
    send(c, 0, ar("w"))
    send(c, 2, ar("w"))
    c.plan()
    now[0] = 61.0
    c.plan()
    c.plan()
    assert len(warnings) == 1 and "'allreduce.w' has waited 61 s for rank 1" in warnings[0]


@pytest.mark.mpi(min_size=1)
def test_stall_shutdown_after_its_time_names_the_name_and_the_missing_ranks():
    now, warnings = [0.0], []
    c = Coordinator(3, fusion_threshold=0, stall_seconds=5, clock=lambda: now[0], warn=warnings.append,
                    shutdown_seconds=20)
    send(c, 1, ar("w"))
    now[0] = 10.0
    assert c.plan() == [] and len(warnings) == 1  # warned, not yet shut down
    now[0] = 21.0
    c.plan()
    plan = c.plan()
    assert [r.kind for r in plan] == ["shutdown"]
    assert "'allreduce.w' waited 21 s for ranks 0,2" in plan[0].error
    assert "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=20" in plan[0].error


@pytest.mark.mpi(min_size=1)
def test_stall_shutdown_is_off_by_default_when_disabled_or_shorter_than_the_warning():
    now, warnings = [0.0], []
    for kwargs in ({}, {"stall_seconds": 0, "shutdown_seconds": 1}, {"stall_seconds": 30, "shutdown_seconds": 10}):
        c = Coordinator(2, fusion_threshold=0, clock=lambda: now[0], warn=warnings.append, **kwargs)
        send(c, 0, ar("w"))
        now[0] += 1000.0
        c.plan()
        assert c.plan() == [] and not c.shutdown
    assert any("less than HOROVOD_STALL_CHECK_TIME_SECONDS" in w for w in warnings)


@pytest.mark.mpi(min_size=1)
def test_shutdown_says_whether_any_rank_records_a_timeline():
    c = Coordinator(2, fusion_threshold=0)
    send(c, 0, shutdown=True)
    send(c, 1)
    assert c.plan()[0].extra is False  # nobody records: the ranks stop without a collective
    c.timelines.clear()
    c.receive(0, Message([], shutdown=True, timeline=True))
    c.receive(1, Message([]))
    assert c.plan()[0].extra is True
