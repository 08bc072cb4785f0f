"""Allreduce on an emulated cluster: time per size and algorithm as a fraction of the link bound, and link bytes.

    python -m mpiml.cluster --hosts 4 --link 1gbit -- python scripts/cluster_allreduce.py --json out/x.json

Run inside ``mpiml.cluster`` (it sets ``MPIML_CLUSTER_LINK_BPS`` and ``MASTER_ADDR``). Rows: every mpiml
algorithm, MPI's own ``Allreduce`` (``mpi``, and ``mpi-raw``: the library called directly) and
torch.distributed's gloo, timed in turn within each size (``mpiml.bench.allreduce_table``). mpiml's
algorithms wait politely across hosts, as ``DistributedOptimizer`` does (``--spin`` to busy-poll instead).

The link bound: the least time any allreduce of n bytes can take when every host has one link of rate B
each way: each host must send, and receive, 2(H-1)/H * n bytes (H hosts), so t = 2(H-1)/H * n / B. With
one rank per host that is the ring's 2(K-1)/K * n / B. B is the TCP payload rate one stream achieved on
the shaped link (``--link-bps``, measured by the caller), which is what a host can really push.

Link bytes: for the largest size, each algorithm runs once more between reads of every host's eth0
counters (local rank 0 of each host reads its own namespace's /sys/class/net/eth0/statistics); the
sum is compared with the cost model's payload bytes (``mpiml.cluster.expected_link_bytes``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_training import init_gloo  # noqa: E402

from mpiml.bench import allreduce_table, format_table, parse_size
from mpiml.cluster import expected_link_bytes
from mpiml.collectives import ALGORITHMS
from mpiml.collectives import allreduce as mpiml_allreduce
from mpiml.collectives._schedule import polling


def gloo_allreduce(comm: MPI.Comm):
    import torch
    import torch.distributed as dist
    init_gloo(comm)
    return lambda buf: dist.all_reduce(torch.from_numpy(buf))


def eth0_bytes() -> int:
    total = 0
    for d in ("rx_bytes", "tx_bytes"):
        with open(f"/sys/class/net/eth0/statistics/{d}") as f:
            total += int(f.read())
    return total


def link_bytes(fn, x: np.ndarray, comm: MPI.Comm, node: MPI.Comm) -> int:
    """Bytes over every host's link (both directions) during one call of ``fn``."""
    comm.Barrier()
    before = eth0_bytes() if node.rank == 0 else 0
    comm.Barrier()
    fn(x)
    comm.Barrier()
    after = eth0_bytes() if node.rank == 0 else 0
    return comm.allreduce(after - before)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64K,256K,1M,4M,16M,64M")
    parser.add_argument("--algorithms", default="mpi,ring,tree,butterfly,hier,auto")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--link-bps", type=float, help="achieved link payload rate in bit/s (default: the "
                        "configured rate from MPIML_CLUSTER_LINK_BPS)")
    parser.add_argument("--spin", action="store_true", help="busy-poll in MPI_Wait instead of testing politely")
    parser.add_argument("--no-gloo", action="store_true")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    hosts = comm.allreduce(1 if node.rank == 0 else 0)
    per_host = node.size
    bps = args.link_bps or float(os.environ.get("MPIML_CLUSTER_LINK_BPS", "0") or 0)
    algorithms = [a for a in args.algorithms.split(",") if a in ALGORITHMS]
    extra = {} if args.no_gloo else {"gloo": gloo_allreduce(comm)}
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    with polling(0.0 if args.spin else 50e-6):
        records = allreduce_table(sizes, algorithms, rounds=args.rounds, iters=args.iters, comm=comm, extra=extra,
                                  warmup=1)
        x = (np.random.default_rng(comm.rank).standard_normal(sizes[-1] // 4) * 0.01).astype(np.float32)
        calls = {a: (lambda buf, a=a: mpiml_allreduce(buf, algorithm=a, comm=comm)) for a in algorithms}
        calls["mpi-raw"] = lambda buf: comm.Allreduce(MPI.IN_PLACE, buf, MPI.SUM)
        calls.update(extra)
        moved = {a: link_bytes(fn, x, comm, node) for a, fn in calls.items()}
    bound_bytes = 2 * (hosts - 1) / hosts
    for r in records:
        bound_s = bound_bytes * r["size_bytes"] * 8 / bps if bps and hosts > 1 else None
        r["link_bound_us"] = bound_s * 1e6 if bound_s else None
        r["fraction_of_link_bound"] = bound_s / (r["time_us"] * 1e-6) if bound_s else None
    links = []
    for a, b in moved.items():
        model = expected_link_bytes(a, sizes[-1] // 4, 4, hosts, per_host)
        links.append({"algorithm": a, "size_bytes": sizes[-1], "link_bytes": b, "model_payload_bytes": model,
                      "ratio_to_model": b / model if model else None})
    if comm.rank == 0:
        print(f"# cluster_allreduce: {hosts} hosts x {per_host} ranks, link payload rate "
              f"{bps / 1e6:.0f} Mbit/s; {MPI.Get_library_version().splitlines()[0].strip()}")
        print(format_table(records, ratios=(("of link", "fraction_of_link_bound"),)))
        print(f"# bytes on the hosts' links for one {sizes[-1] >> 20} MiB allreduce (both directions, all hosts)")
        for row in links:
            model = f"{row['model_payload_bytes'] / 1e6:10.1f}" if row["model_payload_bytes"] else "         -"
            ratio = f"{row['ratio_to_model']:.3f}" if row["ratio_to_model"] else "-"
            print(f"{row['algorithm']:>10} {row['link_bytes'] / 1e6:10.1f} MB  model {model} MB  ratio {ratio}")
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"hosts": hosts, "ranks_per_host": per_host, "link_payload_bps": bps, "argv": sys.argv,
                           "records": records, "link_bytes": links}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
