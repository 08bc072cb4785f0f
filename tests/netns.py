"""Several "hosts" on one machine for the tests: ``mpiml.cluster.Cluster`` with the tests' older interface.

    with Hosts(3) as hosts:                                  # needs root and iproute2
        subprocess.run(hosts.mpiexec() + ["-n", "3", ...])    # Hydra launches one proxy per namespace
        hosts.cut(2)                                         # bring host 2's link down

See ``mpiml/cluster.py`` for how the hosts are built and why MPICH is forced onto TCP.
"""

from __future__ import annotations

from mpiml.cluster import Cluster


class Hosts(Cluster):
    def mpiexec(self, hosts: str | None = None) -> list[str]:  # type: ignore[override]
        """The mpiexec command line without -n and the program; ``hosts`` is Hydra's "name:count,..." list."""
        cmd = super().mpiexec(1)[:-2]  # drop "-n N": the caller gives it
        if hosts is not None:
            cmd[cmd.index("-hosts") + 1] = hosts
        return cmd
