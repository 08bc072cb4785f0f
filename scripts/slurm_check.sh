#!/usr/bin/env bash
# make test-slurm: the Slurm example on a real one-node cluster started here for this run only.
#
#   PYTHON=.venv/bin/python scripts/slurm_check.sh
#
# It installs the Debian packages if missing (slurmctld slurmd slurm-client munge), starts munged, slurmctld
# and slurmd with a private key, slurm.conf, ports, state and logs in a temporary directory (/etc/slurm and
# any Slurm or MUNGE already running are left alone), waits for the node to be idle, and submits
# scripts/examples/slurm/train.sbatch twice with sbatch: once launching the ranks with srun --mpi=pmi2, once
# with python -m mpiml.run, which reads the allocation from SLURM_* and runs the environment's mpiexec inside
# it. Each job must end COMPLETED with exit code 0, and its metrics must show 2 consistent ranks, accuracy
# well above chance, and the same parameters as the other job. On any exit (success, failure, Ctrl-C) the jobs are cancelled, the daemons stopped, and the directory
# removed. Not root, or packages missing and not installable: it prints why and exits 0 (skipped).
#
# Environment: PYTHON (the venv's interpreter, default .venv/bin/python), MPIEXEC (default: the mpiexec next
# to PYTHON), MPIML_SLURM_JOB_TIMEOUT (seconds per job, default 240), MPIML_SLURM_KEEP=1 keeps the directory.
set -euo pipefail

started=$SECONDS
cd "$(dirname "$0")/.."
example=scripts/examples/slurm/train.sbatch
packages=(slurmctld slurmd slurm-client munge)
job_timeout=${MPIML_SLURM_JOB_TIMEOUT:-240}

say() { echo "test-slurm: $*"; }
skip() { say "SKIPPED: $*"; exit 0; }
fail() { say "FAILED: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || skip "needs root (it installs Debian packages and runs slurmd, which starts jobs as root)"

# An absolute path that keeps the venv's python symlink (resolving it would leave the venv).
absolute() {
    if [[ $1 == */* ]]; then
        [[ $1 == /* ]] && echo "$1" || echo "$PWD/$1"
    else
        command -v "$1"
    fi
}
python=$(absolute "${PYTHON:-.venv/bin/python}") || fail "no python ${PYTHON:-}"
[[ -x $python ]] || fail "no python at $python (make install first)"
mpiexec=$(absolute "${MPIEXEC:-$(dirname "$python")/mpiexec}") || fail "no mpiexec ${MPIEXEC:-}"
[[ -x $mpiexec ]] || fail "no mpiexec at $mpiexec"

# Nothing from a surrounding Slurm job (make test run inside an allocation) may leak into this cluster.
while read -r name; do unset "$name"; done < <(compgen -e | grep '^SLURM_' || true)

# --- packages -------------------------------------------------------------------------------------------
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || skip "the packages ${missing[*]} are missing and there is no apt-get"
    say "installing ${missing[*]} (apt-get install --no-install-recommends)"
    t=$SECONDS
    apt_log=$(mktemp /tmp/mpiml-slurm-apt.XXXXXX)
    install() {
        DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q --no-install-recommends \
            -o Acquire::http::Timeout=30 "${missing[@]}" >>"$apt_log" 2>&1
    }
    if ! install; then
        say "apt-get install failed; apt-get update, then again"
        if ! { timeout 900 apt-get update -q >>"$apt_log" 2>&1 && install; }; then
            tail -n 5 "$apt_log"
            rm -f "$apt_log"
            skip "the packages ${missing[*]} are missing and apt-get could not install them (above)"
        fi
    fi
    rm -f "$apt_log"
    say "installed ${missing[*]} in $((SECONDS - t)) s"
fi
for tool in munged munge unmunge slurmctld slurmd sbatch scontrol sinfo squeue scancel srun; do
    command -v "$tool" >/dev/null || fail "$tool is missing although ${packages[*]} are installed"
done

# --- a private cluster ----------------------------------------------------------------------------------
work=$(mktemp -d /tmp/mpiml-slurm.XXXXXX)
conf=$work/slurm.conf
pids=()
job_ids=()
cleanup() {
    local rc=$? pid deadline
    set +e
    trap - EXIT INT TERM
    if [[ -S $work/run/munge.sock && -n ${ctld_pid:-} ]]; then
        scancel --quiet --user="$(id -un)" 2>/dev/null
        deadline=$((SECONDS + 15))
        while [[ -n $(squeue -h -o %i 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.2; done
    fi
    # slurmd, then slurmctld, then munged: the reverse of their start.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        pid=${pids[i]}
        kill -TERM "$pid" 2>/dev/null || continue
        deadline=$((SECONDS + 10))
        while running "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    # Whatever the daemons started and left (slurmstepd, a job's ranks) still has this cluster's SLURM_CONF.
    for pid in $(leftovers); do
        say "killing leftover process $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-100)"
        kill -KILL "$pid" 2>/dev/null
    done
    # A rank killed inside MPI_Init leaves MPICH's shared memory behind, named after the PMI job (job.step).
    for id in "${job_ids[@]}"; do
        rm -f "/dev/shm/mpich_shm_$(fnv1a "$id.0")_"* "/dev/shm/mpich_vci_$(fnv1a "$id.0")_"*
    done
    if [[ ${MPIML_SLURM_KEEP:-0} == 1 ]]; then say "kept $work"; else rm -rf "$work"; fi
    say "$( ((rc == 0)) && echo passed || echo "failed (exit $rc)"), $((SECONDS - started)) s in all"
    exit "$rc"
}
# Whether process $1 exists and has not exited (an exited child stays a zombie until waited for).
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}
# Processes other than this script whose environment holds this cluster's SLURM_CONF.
leftovers() {
    local p pid
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
        tr '\0' '\n' 2>/dev/null <"$p/environ" | grep -qxF "SLURM_CONF=$conf" && echo "$pid"
    done
    return 0
}
# MPICH's world id, which names its shared memory: the 32-bit FNV-1a hash of the PMI job name, in hex.
fnv1a() {
    local h=2166136261 c i
    for ((i = 0; i < ${#1}; i++)); do
        printf -v c %d "'${1:i:1}"
        h=$(((h ^ c) * 16777619 & 0xffffffff))
    done
    printf %x "$h"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM

chmod 755 "$work"                 # munged wants every directory above its socket searchable by all
mkdir -m 700 "$work/key"
mkdir -m 755 "$work/run"
mkdir "$work/state" "$work/spool" "$work/log"
node=$(hostname -s)
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)   # nproc obeys both, and make sets the first
# Two free TCP ports for slurmctld and slurmd, so that a Slurm already on this machine does not matter.
read -r ctld_port slurmd_port < <("$python" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("", 0))
print(*(s.getsockname()[1] for s in socks))')
touch "$work/plugstack.conf"
cat >"$conf" <<EOF
# One node, this machine; written by scripts/slurm_check.sh for one run.
ClusterName=mpiml-check
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$work/run/munge.sock
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/run/slurmctld.pid
SlurmdPidFile=$work/run/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
PlugStackConfig=$work/plugstack.conf
# No cgroups, no accounting: what works in a container or VM without systemd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Job ids from a random start: srun's PMI names a job's MPI world job.step, MPICH names its shared memory
# after it, and a segment left by a killed rank of an earlier run's job 1 would corrupt this run's job 1.
FirstJobId=$((RANDOM * 32768 % 60000000 + RANDOM + 1000))
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
# Keep the node as configured (the 2-task example fits even on a 1-core machine).
SlurmdParameters=config_overrides
NodeName=$node NodeAddr=127.0.0.1 CPUs=$((cpus < 2 ? 2 : cpus)) State=UNKNOWN
PartitionName=check Nodes=$node Default=YES MaxTime=30 State=UP
EOF
export SLURM_CONF=$conf

log_tails() {
    local f
    for f in "$work"/log/munged.out "$work"/log/*.log; do
        echo "--- $f (last 15 lines)"
        tail -n 15 "$f"
    done
}
# Start a daemon in the foreground as a child of this script, so that its pid is known and it is reaped, in
# a session of its own, so that Ctrl-C stops this script (which cancels the jobs, then stops the daemons)
# and not the daemons under the jobs.
start() {
    local name=$1
    shift
    setsid "$@" >"$work/log/$name.out" 2>&1 &
    pids+=($!)
}
alive() { kill -0 "${pids[-1]}" 2>/dev/null || { log_tails; fail "$1 exited at start"; }; }
# Wait up to $1 seconds for the command after it to succeed.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}
t=$SECONDS
# A new key for this run (mungekey came with MUNGE 0.5.14; before it, 1 KiB of random bytes was the recipe).
if command -v mungekey >/dev/null; then
    mungekey --create --keyfile="$work/key/munge.key"
else
    dd if=/dev/urandom of="$work/key/munge.key" bs=1024 count=1 status=none
    chmod 600 "$work/key/munge.key"
fi
# In the foreground munged logs to stderr (log/munged.out).
start munged munged --foreground --socket="$work/run/munge.sock" --key-file="$work/key/munge.key" \
    --pid-file="$work/run/munged.pid" --seed-file="$work/key/munged.seed"
munge_ok() { munge -n -S "$work/run/munge.sock" | unmunge -S "$work/run/munge.sock"; }
wait_for 10 munge_ok || { log_tails; fail "munged did not answer within 10 s"; }
alive munged
start slurmctld slurmctld -D -i
ctld_pid=${pids[-1]}
wait_for 20 scontrol ping || { log_tails; fail "slurmctld did not answer within 20 s"; }
alive slurmctld
start slurmd slurmd -D -N "$node"
idle() { [[ $(sinfo -h -n "$node" -o %t) == idle ]]; }
wait_for 30 idle || { sinfo; log_tails; fail "node $node not idle within 30 s"; }
alive slurmd
say "munged, slurmctld, slurmd up in $((SECONDS - t)) s; node $node idle ($cpus CPUs), $work"

# --- the example, twice ---------------------------------------------------------------------------------
# sbatch --wait would do, but in Slurm 22.05 it polls after 2, 10 and 42 s (each sleep 4 times the last),
# adding up to 30 s to every job; scontrol every 0.5 s ends within a second of the job and reads its
# state and exit code in the same call.
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }
run_example() {
    local launcher=$1 out=$work/$1.out id record state t=$SECONDS deadline=$((SECONDS + job_timeout))
    id=$(MPIML_PYTHON=$python MPIML_MPIEXEC=$mpiexec MPIML_LAUNCHER=$launcher MPIML_METRICS=$work/$launcher.jsonl \
        MPIML_EPOCHS=2 sbatch --parsable --job-name="mpiml-$launcher" --nodes=1 --ntasks=2 --time=5 --output="$out" \
        "$example") || fail "sbatch refused $example"
    job_ids+=("$id")
    while :; do
        record=$(scontrol show job -o "$id")
        state=$(field JobState "$record")
        case $state in
            PENDING | CONFIGURING | RUNNING | COMPLETING | SUSPENDED | REQUEUED | RESIZING) ;;
            *) break ;;
        esac
        if ((SECONDS >= deadline)); then
            scancel "$id"
            echo "--- job $id output"; cat "$out" 2>/dev/null
            fail "job $id ($launcher) still $state after $job_timeout s; cancelled"
        fi
        sleep 0.5
    done
    if [[ $state != COMPLETED || $(field ExitCode "$record") != 0:0 ]]; then
        echo "--- job $id output"; cat "$out" 2>/dev/null
        log_tails
        fail "job $id ($launcher) ended $state, exit code $(field ExitCode "$record")"
    fi
    say "job $id ($launcher): COMPLETED, exit code 0:0, $((SECONDS - t)) s"
}
check_metrics() {
    "$python" - "$work/srun.jsonl" "$work/mpiml.run.jsonl" <<'EOF'
import json, sys

finals = {}
for path in sys.argv[1:]:
    try:
        with open(path) as f:
            last = json.loads(f.read().splitlines()[-1])
    except (OSError, IndexError, ValueError) as e:
        sys.exit(f"{path}: no final metrics line ({e})")
    problems = [what for what, bad in [
        ("not the final line", last.get("final") is not True),
        (f"ranks {last.get('ranks')}, expected 2", last.get("ranks") != 2),
        ("ranks not consistent", last.get("ranks_consistent") is not True),
        (f"test accuracy {last.get('test_accuracy')}, expected >= 0.5 (chance: 0.1)",
         not isinstance(last.get("test_accuracy"), float) or last["test_accuracy"] < 0.5),
    ] if bad]
    if problems:
        sys.exit(f"{path}: {'; '.join(problems)}: {last}")
    finals[path] = last
    print(f"test-slurm: {path.rsplit('/', 1)[-1]}: 2 ranks consistent, test accuracy {last['test_accuracy']:.2%}, "
          f"params {last['params_sha256'][:16]}")
hashes = {last["params_sha256"] for last in finals.values()}
if len(hashes) != 1:
    sys.exit(f"srun and mpiml.run trained different parameters: {sorted(hashes)}")
EOF
}
run_example srun
run_example mpiml.run
check_metrics || { for f in "$work"/srun.out "$work"/mpiml.run.out; do echo "--- $f"; cat "$f"; done; fail "metrics"; }
