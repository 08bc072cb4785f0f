"""An emulated cluster on one machine: hosts are network namespaces on a bridge, links shaped with ``tc``.

    python -m mpiml.cluster --hosts 4 --ranks-per-host 1 --link 1gbit -- python -m mpiml.train ...

Each host ``mpiml-<pid>-hN`` is a network namespace with its own hostname
(``unshare --uts``), an interface ``eth0`` with address 10.S.0.1N/24, and a
veth peer on a bridge in the root namespace (10.S.0.1/24). ``--link RATE``
puts a token bucket (``tc qdisc ... tbf``) on *both* ends of every host's
veth, so each host sends and receives at most RATE (a star network: every
host has one link to one switch). This kernel has no ``netem``: rate can be
shaped, delay cannot.

The job is launched through Hydra (MPICH's ``mpiexec``) with a stand-in for
ssh that enters the namespace; each namespace is one node to MPICH (one
Hydra proxy), so ranks of one host share memory as on a real cluster, and
``MPI_Comm_split_type(SHARED)`` finds the hosts. UCX, MPICH's network layer,
would still see one machine and move bytes between hosts through its own
shared-memory transports; ``UCX_TLS=tcp,self`` and ``UCX_NET_DEVICES=eth0``
keep it on TCP over the shaped links. (``MPIR_CVAR_NOLOCAL=1`` is not used:
it also hides the ranks that do share a host, so every rank looks like a
host of its own.) With ``--mpi openmpi`` the launch goes through PRRTE's
ssh agent and Open MPI's TCP BTL on ``eth0``. Before the job, one link is measured with
a TCP stream and the achieved rate is printed. ``MASTER_ADDR`` and
``GLOO_SOCKET_IFNAME`` are set for torch.distributed (gloo) jobs, and
``MPIML_CLUSTER_LINK_BPS`` for scripts that compare with the link bound.

Everything is removed afterwards, on success, error, Ctrl-C or SIGTERM; a
cluster left behind by a SIGKILLed run (its pid is in every name) is removed
by the next run, or by ``python -m mpiml.cluster --cleanup``.

Library use (the tests and the benchmark scripts do this)::

    with Cluster(hosts=2, link="1gbit") as c:
        subprocess.run(c.mpiexec(ranks_per_host=1) + ["python", "job.py"])
        c.bytes_on_links()
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

__all__ = ["Cluster", "ClusterError", "parse_rate", "format_rate", "measure_link", "check_environment", "cleanup",
           "expected_link_bytes", "main"]

PREFIX = "mpiml-"
LOCK_PATH = "/tmp/mpiml-netns.lock"
# A token bucket deep enough for one 64 KiB GSO segment plus slack; at 1 Gbit/s this is 2 ms of traffic.
BURST = "256kb"
LATENCY = "50ms"
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}

# Hydra's stand-in for ssh: "nslaunch [-x ...] HOST COMMAND..." runs COMMAND inside namespace HOST,
# with its own hostname, so MPI sees separate hosts.
_NSLAUNCH = """#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in
    -*) shift ;;
    *) break ;;
  esac
done
host="$1"; shift
exec ip netns exec "$host" unshare --uts sh -c "hostname $host; $*"
"""


class ClusterError(Exception):
    """The emulated cluster cannot be set up here (not root, tools missing, bad arguments)."""


def parse_rate(text: str) -> float:
    """``"1gbit"`` -> 1e9 bits per second (tc's bit units: bit, kbit, mbit, gbit, tbit)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]+)\s*", text or "")
    if not m or m.group(2).lower() not in _UNITS:
        raise ClusterError(f"link rate {text!r} is not a rate like 1gbit, 100mbit or 500kbit "
                           f"(units: {', '.join(_UNITS)}; bytes per second are not accepted, to avoid tc's "
                           "mbps = megabytes confusion)")
    bps = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not 8e3 <= bps <= 1e12:
        raise ClusterError(f"link rate {text!r} is outside 8kbit..1tbit")
    return bps


def format_rate(bps: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps:.0f} bit/s"


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip()}")
    return done


def check_environment(shaped: bool = True) -> None:
    """Refuse, with the reason, where namespaces or shaping cannot work."""
    if os.geteuid() != 0:
        raise ClusterError("the emulated cluster needs root (it creates network namespaces and shapes links); "
                           "run it as root or with sudo")
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            raise ClusterError(f"`{tool}` is not installed (Debian package {package})")
    if shaped:
        _check_tbf()


def _check_tbf() -> None:
    """Shape a throwaway dummy link: the kernel must have the tbf qdisc."""
    name = f"mpt{os.getpid() % 100000}"
    made = _sh("ip", "link", "add", name, "type", "dummy", check=False)
    if made.returncode != 0:  # no dummy driver: try a veth pair instead
        made = _sh("ip", "link", "add", name, "type", "veth", "peer", "name", name + "p", check=False)
        if made.returncode != 0:
            raise ClusterError(f"cannot create a test link: {made.stderr.strip()}")
    try:
        done = _sh("tc", "qdisc", "add", "dev", name, "root", "tbf", "rate", "1gbit", "burst", BURST, "latency",
                   LATENCY, check=False)
        if done.returncode != 0:
            raise ClusterError("`tc qdisc ... tbf` does not work here (the kernel needs the sch_tbf module): "
                               + done.stderr.strip())
    finally:
        _sh("ip", "link", "del", name, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup(only_dead: bool = True) -> list[str]:
    """Remove namespaces and links of emulated clusters whose owning process is gone; returns what was removed."""
    removed = []
    owners = {}
    for name in _sh("ip", "netns", "list", check=False).stdout.split():
        m = re.fullmatch(rf"{PREFIX}(\d+)-h\d+", name)
        if m:
            owners.setdefault(int(m.group(1)), []).append(("netns", name))
    for line in _sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(r"\d+:\s+(mb|mv)(\d+)(x\d+)?[@:]", line)
        if m:
            owners.setdefault(int(m.group(2)), []).append(("link", m.group(1) + m.group(2) + (m.group(3) or "")))
    for pid, things in owners.items():
        if only_dead and _alive(pid):
            continue
        for kind, name in things:
            if kind == "netns":
                for p in _sh("ip", "netns", "pids", name, check=False).stdout.split():
                    _sh("kill", "-9", p, check=False)
                _sh("ip", "netns", "del", name, check=False)
            else:
                _sh("ip", "link", "del", name, check=False)
            removed.append(name)
    return removed


class Cluster:
    """``hosts`` namespaces on a bridge, each link optionally shaped to ``link`` (e.g. "1gbit") both ways."""

    def __init__(self, hosts: int, link: str | None = None, burst: str = BURST) -> None:
        if hosts < 1:
            raise ClusterError(f"--hosts must be at least 1, got {hosts}")
        if hosts > 200:
            raise ClusterError(f"--hosts {hosts} is more than the 200 addresses the emulated subnet has")
        self.count = hosts
        self.link = link
        self.link_bps = parse_rate(link) if link else None
        self.burst = burst
        pid = os.getpid()
        self.names = [f"{PREFIX}{pid}-h{i}" for i in range(1, hosts + 1)]
        self.bridge = f"mb{pid}"
        self.veths = [f"mv{pid}x{i}" for i in range(1, hosts + 1)]
        self.subnet = 0
        self.addresses: list[str] = []
        self._lock: Any = None
        self._tmp: str | None = None
        self.nslaunch = ""

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> Cluster:
        check_environment(shaped=self.link is not None)
        # One cluster on the machine at a time: concurrent ones would fight over addresses, and the CPU.
        self._lock = open(LOCK_PATH, "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            cleanup(only_dead=True)
            used = _sh("ip", "-4", "addr").stdout
            self.subnet = next(s for s in range(60, 250) if f"10.{s}.0." not in used)
            self.addresses = [f"10.{self.subnet}.0.{10 + i}" for i in range(1, self.count + 1)]
            self._tmp = tempfile.mkdtemp(prefix="mpiml-cluster-")
            self.nslaunch = os.path.join(self._tmp, "nslaunch")
            with open(self.nslaunch, "w") as f:
                f.write(_NSLAUNCH)
            os.chmod(self.nslaunch, 0o755)
            _sh("ip", "link", "add", self.bridge, "type", "bridge")
            _sh("ip", "addr", "add", f"10.{self.subnet}.0.1/24", "dev", self.bridge)
            _sh("ip", "link", "set", self.bridge, "up")
            for name, veth, addr in zip(self.names, self.veths, self.addresses):
                _sh("ip", "netns", "add", name)
                _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
                _sh("ip", "link", "set", veth, "master", self.bridge)
                _sh("ip", "link", "set", veth, "up")
                self.ns(name, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
                self.ns(name, "ip", "link", "set", "eth0", "up")
                self.ns(name, "ip", "link", "set", "lo", "up")
                if self.link:
                    self.shape(name, veth, self.link)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.names:
            for pid in _sh("ip", "netns", "pids", name, check=False).stdout.split():
                _sh("kill", "-9", pid, check=False)
            _sh("ip", "netns", "del", name, check=False)
        for veth in self.veths:  # gone with its namespace, unless a dying process still holds that
            _sh("ip", "link", "del", veth, check=False)
        _sh("ip", "link", "del", self.bridge, check=False)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    # ------------------------------------------------------------------ links

    def ns(self, name: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return _sh("ip", "netns", "exec", name, *cmd, check=check)

    def shape(self, name: str, veth: str, rate: str) -> None:
        """A token bucket on both ends of one host's link: what the host sends, and what it receives."""
        tbf = ["root", "tbf", "rate", rate, "burst", self.burst, "latency", LATENCY]
        self.ns(name, "tc", "qdisc", "replace", "dev", "eth0", *tbf)
        _sh("tc", "qdisc", "replace", "dev", veth, *tbf)

    def cut(self, host: int) -> None:
        """Bring host ``host``'s (1-based) link down, as if its cable were pulled."""
        _sh("ip", "link", "set", self.veths[host - 1], "down")

    def bytes_on_links(self) -> int:
        """Bytes received plus sent on every host's link so far."""
        return sum(self.link_bytes())

    def link_bytes(self) -> list[int]:
        """Per host: bytes its link carried so far, both directions (the bridge port's counters)."""
        out = []
        for veth in self.veths:
            total = 0
            for d in ("rx_bytes", "tx_bytes"):
                with open(f"/sys/class/net/{veth}/statistics/{d}") as f:
                    total += int(f.read())
            out.append(total)
        return out

    # ------------------------------------------------------------------ launching

    def hydra_options(self) -> list[str]:
        """Hydra's options for these hosts, without ``-hosts`` and ``-n``: the stand-in for ssh, the bridge for
        Hydra's own traffic, UCX kept on TCP over ``eth0`` (``mpiml.run --mpi-args`` takes them as they are)."""
        cmd = ["-launcher", "ssh", "-launcher-exec", self.nslaunch, "-iface", self.bridge,
               "-genv", "UCX_TLS", "tcp,self", "-genv", "UCX_NET_DEVICES", "eth0"]
        for k, v in self.env().items():
            cmd += ["-genv", k, v]
        return cmd

    def env(self) -> dict[str, str]:
        """Variables every rank gets: where torch.distributed meets, and the link rate for benchmarks."""
        env = {"MASTER_ADDR": self.addresses[0], "GLOO_SOCKET_IFNAME": "eth0", "MPIML_CLUSTER_HOSTS": str(self.count)}
        if self.link_bps:
            env["MPIML_CLUSTER_LINK_BPS"] = str(int(self.link_bps))
        return env

    def host_spec(self, ranks_per_host: int | Sequence[int] = 1) -> list[tuple[str, int]]:
        per = [ranks_per_host] * self.count if isinstance(ranks_per_host, int) else list(ranks_per_host)
        return [(name, n) for name, n in zip(self.names, per) if n > 0]

    def mpiexec(self, ranks_per_host: int | Sequence[int] = 1, mpi: str = "mpich",
                mpiexec: str | None = None) -> list[str]:
        """The launcher's command line up to and including ``-n N``; append the program and its arguments."""
        spec = self.host_spec(ranks_per_host)
        n = sum(c for _, c in spec)
        if mpiexec is None:
            mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        if mpi == "mpich":
            hosts = ",".join(f"{name}:{c}" for name, c in spec)
            return [mpiexec, "-hosts", hosts, *self.hydra_options(), "-n", str(n)]
        if mpi == "openmpi":
            cmd = [mpiexec, "--prtemca", "plm_ssh_agent", self.nslaunch, "--host",
                   ",".join(f"{name}:{c}" for name, c in spec), "--bind-to", "none", "--oversubscribe",
                   "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "eth0",
                   "--prtemca", "oob_tcp_if_include", f"10.{self.subnet}.0.0/24", "--mca", "pml", "ob1",
                   "--mca", "osc", "^ucx"]
            for k, v in self.env().items():
                cmd += ["-x", f"{k}={v}"]
            return cmd + ["-n", str(n)]
        raise ClusterError(f"--mpi must be mpich or openmpi, got {mpi!r}")


# ---------------------------------------------------------------------- the links' cost model

def _cross_host_bytes(schedule_of: Any, p: int, host_of: Any, itemsize: int) -> int:
    """Payload bytes of one schedule per rank (``schedule_of(r)``) that cross from one host to another."""
    total = 0
    for r in range(p):
        for s in schedule_of(r).steps:
            if s.send_to >= 0 and s.send_hi > s.send_lo and host_of(s.send_to) != host_of(r):
                total += (s.send_hi - s.send_lo) * itemsize
    return total


def expected_link_bytes(algorithm: str, n: int, itemsize: int, hosts: int, per_host: int) -> int | None:
    """Payload bytes an allreduce of ``n`` elements puts on the hosts' links, as their counters see it.

    Built from the same schedules the algorithms run (ranks numbered host by host, ``per_host`` on
    each): every send between ranks of different hosts leaves one link and enters another, so it is
    counted twice (tx at one end, rx at the other). Frame headers and TCP acknowledgements are not
    included: measured counters run a few per cent above. None for algorithms whose messages are the
    MPI library's own (``mpi``), which mpiml cannot see."""
    from .collectives import _chunks, auto, butterfly, ring, tree
    p = hosts * per_host

    def host_of(r: int) -> int:
        return r // per_host
    if algorithm == "auto":
        algorithm = auto.network_choice(n * itemsize, hosts, per_host)
    if p == 1 or hosts == 1:
        return 0
    scheduled = {"ring": ring, "tree": tree, "butterfly": butterfly}
    if algorithm in scheduled:
        module = scheduled[algorithm]
        model = _cross_host_bytes(lambda r: module.allreduce_schedule(n, itemsize, p, r), p, host_of, itemsize)
    elif algorithm == "hier":  # local rank i carries slice i across the hosts, through a ring of ``hosts`` ranks
        bounds = _chunks.chunk_bounds(n, per_host)
        model = sum(_cross_host_bytes(
            lambda h, m=bounds[i + 1] - bounds[i]: ring.allreduce_schedule(m, itemsize, hosts, h),
            hosts, lambda h: h, itemsize) for i in range(per_host))
    else:
        return None
    return 2 * model


# ---------------------------------------------------------------------- measuring a link

_SINK = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); buf = bytearray(1 << 20); n = 0; first = None
while True:
    k = c.recv_into(buf)
    if not k:
        break
    if first is None:
        first = time.perf_counter(); k0 = k
    n += k
end = time.perf_counter()
print(n - k0, end - first, flush=True)
"""

_SOURCE = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
data = b"x" * (1 << 20); end = time.perf_counter() + float(sys.argv[3])
while time.perf_counter() < end:
    c.sendall(data)
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
"""


def measure_link(cluster: Cluster, src: int = 1, dst: int = 2, seconds: float = 1.0) -> float:
    """Send one TCP stream from host ``src`` to host ``dst`` (1-based) for ``seconds``; payload bits per second.

    The receiver times from its first byte to the end of the stream, so connection setup does not count;
    the stream crosses ``src``'s link and then ``dst``'s, both shaped."""
    if cluster.count < 2:
        raise ClusterError("measuring a link needs at least 2 hosts")
    sink = subprocess.Popen(["ip", "netns", "exec", cluster.names[dst - 1], sys.executable, "-c", _SINK,
                             cluster.addresses[dst - 1]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = sink.stdout.readline().strip()
        if not port:
            raise ClusterError(f"link probe receiver did not start: {sink.stderr.read().strip()}")
        _sh("ip", "netns", "exec", cluster.names[src - 1], sys.executable, "-c", _SOURCE,
            cluster.addresses[dst - 1], port, str(seconds))
        out, err = sink.communicate(timeout=30 + 2 * seconds)
        nbytes, elapsed = out.split()
        return 8 * int(nbytes) / float(elapsed)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()


# ---------------------------------------------------------------------- the command line

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mpiml.cluster",
        description="Run an MPI job on an emulated cluster: network namespaces on a bridge, links shaped with tc.",
        epilog="example: python -m mpiml.cluster --hosts 4 --ranks-per-host 1 --link 1gbit -- "
               "python -m mpiml.train --epochs 2")
    p.add_argument("--hosts", type=int, default=2, help="number of emulated hosts (default 2)")
    p.add_argument("--ranks-per-host", type=int, default=1, help="MPI ranks on each host (default 1)")
    p.add_argument("--link", metavar="RATE", help="shape every host's link to RATE in each direction, e.g. 1gbit, "
                   "100mbit (default: unshaped)")
    p.add_argument("--mpi", choices=["mpich", "openmpi"], default="mpich",
                   help="which MPI's launcher to use (default mpich: Hydra)")
    p.add_argument("--mpiexec", metavar="PATH", help="the launcher (default: mpiexec next to this Python)")
    p.add_argument("--no-measure", action="store_true", help="skip measuring a link before the job")
    p.add_argument("--measure-seconds", type=float, default=1.0, help="length of the link measurement (default 1)")
    p.add_argument("--cleanup", action="store_true",
                   help="remove namespaces and links left behind by killed runs, then exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the program and its arguments")
    return p


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if args.cleanup:
            check_environment(shaped=False)
            removed = cleanup(only_dead=True)
            print(f"mpiml.cluster: removed {len(removed)} leftover namespaces and links"
                  + (f": {', '.join(removed)}" if removed else ""), file=sys.stderr)
            return 0
        if not command:
            raise ClusterError("no command to run: give it after --, e.g. -- python -m mpiml.train")
        if args.ranks_per_host < 1:
            raise ClusterError(f"--ranks-per-host must be at least 1, got {args.ranks_per_host}")
        if not 0 < args.measure_seconds <= 60:
            raise ClusterError(f"--measure-seconds must be in (0, 60], got {args.measure_seconds}")
        cluster = Cluster(args.hosts, args.link)  # checks --hosts and --link before anything is created
        mpiexec = args.mpiexec or os.path.join(os.path.dirname(sys.executable), "mpiexec")
        if not (os.path.isfile(mpiexec) and os.access(mpiexec, os.X_OK)):
            raise ClusterError(f"{mpiexec} is not an executable mpiexec (give one with --mpiexec)")
    except ClusterError as e:
        print(f"mpiml.cluster: error: {e}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with cluster:
            print(f"mpiml.cluster: {args.hosts} hosts x {args.ranks_per_host} ranks, link "
                  f"{format_rate(cluster.link_bps) + ' each way' if cluster.link_bps else 'unshaped'}, "
                  f"{args.mpi}", file=sys.stderr, flush=True)
            if args.hosts > 1 and not args.no_measure:
                got = measure_link(cluster, 1, 2, args.measure_seconds)
                ratio = f" ({got / cluster.link_bps:.2f} of the configured rate)" if cluster.link_bps else ""
                print(f"mpiml.cluster: measured link {cluster.names[0]} -> {cluster.names[1]}: "
                      f"{format_rate(got)}, {got / 8e6:.1f} MB/s of TCP payload{ratio}", file=sys.stderr, flush=True)
            cmd = cluster.mpiexec(args.ranks_per_host, args.mpi, mpiexec) + command
            env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
            before = cluster.bytes_on_links()
            job = subprocess.Popen(cmd, env=env)
            try:
                code = job.wait()
                print(f"mpiml.cluster: the hosts' links carried {(cluster.bytes_on_links() - before) / 1e6:.1f} MB "
                      "during the job (sent plus received, every host)", file=sys.stderr, flush=True)
                return code
            except BaseException:
                job.terminate()
                try:
                    job.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    job.kill()
                    job.wait()
                raise
    except ClusterError as e:
        print(f"mpiml.cluster: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mpiml.cluster: interrupted; the cluster is removed", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
