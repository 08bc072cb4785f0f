"""Several "hosts" on one machine: network namespaces joined by a bridge, real TCP between them.

    with Hosts(3) as hosts:              # needs root and iproute2
        hosts.mpiexec(["-n", "3"]) + [...]   # Hydra launches one proxy per namespace
        hosts.cut(2)                      # bring host 2's link down

Each host hN is a namespace with its own hostname (``unshare --uts``), an
interface eth0 with address 10.X.0.1N/24, and a veth peer on a bridge in the
root namespace (10.X.0.1/24). Hydra starts its proxies through
``tests/nslaunch`` (in place of ssh) and is told to use the bridge. MPICH
would still move bytes through shared memory (one machine, one /dev/shm),
so the environment forces its network path: ``MPIR_CVAR_NOLOCAL=1``,
``UCX_TLS=tcp,self``, ``UCX_NET_DEVICES=eth0`` (see shared/MULTIHOST.md).
"""

from __future__ import annotations

import fcntl
import os
import random
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
NSLAUNCH = os.path.join(HERE, "nslaunch")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


class Hosts:
    def __init__(self, count: int) -> None:
        self.count = count
        self.tag = f"{os.getpid() % 1000:03d}{random.randint(0, 99):02d}"
        self.subnet = 60 + random.randint(0, 150)
        self.bridge = f"mb{self.tag}"
        self.names = [f"mh{self.tag}{i}" for i in range(1, count + 1)]
        self.veths = [f"mv{self.tag}{i}" for i in range(1, count + 1)]

    def __enter__(self) -> Hosts:
        # One set of hosts on the machine at a time: concurrent runs would fight over addresses and routes.
        self._lock = open("/tmp/mpiml-netns.lock", "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        used = sh("ip", "-4", "addr").stdout
        while f"10.{self.subnet}.0.1/" in used:
            self.subnet = 60 + random.randint(0, 150)
        try:
            sh("ip", "link", "add", self.bridge, "type", "bridge")
            sh("ip", "addr", "add", f"10.{self.subnet}.0.1/24", "dev", self.bridge)
            sh("ip", "link", "set", self.bridge, "up")
            for i, (name, veth) in enumerate(zip(self.names, self.veths), start=1):
                sh("ip", "netns", "add", name)
                sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
                sh("ip", "link", "set", veth, "master", self.bridge)
                sh("ip", "link", "set", veth, "up")
                sh("ip", "netns", "exec", name, "ip", "addr", "add", f"10.{self.subnet}.0.1{i}/24", "dev", "eth0")
                sh("ip", "netns", "exec", name, "ip", "link", "set", "eth0", "up")
                sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.names:
            pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", name, check=False)
        for veth in self.veths:  # gone with its namespace, unless a dying process still holds that
            sh("ip", "link", "del", veth, check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        if getattr(self, "_lock", None) is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def mpiexec(self, hosts: str | None = None) -> list[str]:
        """The mpiexec command line (without -n and the program) that starts ranks in the namespaces."""
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        return [mpiexec, "-launcher", "ssh", "-launcher-exec", NSLAUNCH, "-iface", self.bridge,
                "-hosts", hosts or ",".join(self.names),
                "-genv", "MPIR_CVAR_NOLOCAL", "1", "-genv", "UCX_TLS", "tcp,self", "-genv", "UCX_NET_DEVICES", "eth0"]

    def bytes_on_links(self) -> int:
        """Bytes received plus sent on every host's link so far."""
        total = 0
        for veth in self.veths:
            for d in ("rx_bytes", "tx_bytes"):
                with open(f"/sys/class/net/{veth}/statistics/{d}") as f:
                    total += int(f.read())
        return total

    def cut(self, host: int) -> None:
        """Bring host ``host``'s (1-based) link down, as if its cable were pulled."""
        sh("ip", "link", "set", self.veths[host - 1], "down")
