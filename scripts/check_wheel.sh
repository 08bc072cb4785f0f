#!/usr/bin/env bash
# What a new user gets from pip alone: build mpiml's wheel, install it with the
# mpich extra into a fresh virtual environment (torch==2.13.0 first, the CPU
# build), then, from a directory outside the repository, run a short
# `mpiexec -n 2 python -m mpiml.train` and compare mpiml.collectives.allreduce
# with mpi4py's Allreduce. Fails on any missing runtime dependency.
#
#   scripts/check_wheel.sh            (make test-wheel)
#
# PYTHON: the interpreter that builds the wheel (default .venv/bin/python);
# BASE_PYTHON: the one the fresh venv is made from (default python3).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_python=${PYTHON:-$repo/.venv/bin/python}
base_python=${BASE_PYTHON:-python3}
torch_pin=torch==2.13.0
# The script changes directory: make relative interpreter paths absolute.
case "$build_python" in /*) ;; */*) build_python=$PWD/$build_python ;; esac
case "$base_python" in /*) ;; */*) base_python=$PWD/$base_python ;; esac
export OMP_NUM_THREADS=1
unset PYTHONPATH

start=$SECONDS
tmp=$(mktemp -d -t mpiml-wheel.XXXXXX)
finish() {
  local rc=$?
  rm -rf "$tmp"
  if [ "$rc" -eq 0 ]; then
    echo "check_wheel: OK in $((SECONDS - start)) s"
  else
    echo "check_wheel: FAILED (exit $rc) after $((SECONDS - start)) s" >&2
  fi
  exit "$rc"
}
trap finish EXIT
case "$tmp/" in "$repo"/*) echo "check_wheel: temp dir $tmp is inside the repository" >&2; exit 1 ;; esac

# Build from a copy of the files git sees (tracked, and untracked but not
# ignored), so that no stale build/ or egg-info of the working tree leaks in.
echo "== building the wheel"
mkdir "$tmp/src" "$tmp/dist" "$tmp/run"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
   | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
   | tar --null -T - -cf -) | tar -xf - -C "$tmp/src"
(cd "$tmp/src" && "$build_python" -m pip wheel -q --no-deps -w "$tmp/dist" .)
wheels=("$tmp"/dist/mpiml-*.whl)
[ "${#wheels[@]}" -eq 1 ] && [ -f "${wheels[0]}" ] || { echo "check_wheel: expected one wheel in $tmp/dist" >&2; exit 1; }
wheel=${wheels[0]}
echo "built $(basename "$wheel")"

echo "== fresh venv: $torch_pin, then the wheel with [mpich]"
"$base_python" -m venv "$tmp/venv"
py=$tmp/venv/bin/python
"$py" -m pip install -q "$torch_pin"
"$py" -m pip install -q "$wheel[mpich]"
mpiexec=$tmp/venv/bin/mpiexec
[ -x "$mpiexec" ] || { echo "check_wheel: the mpich extra gave no $mpiexec" >&2; exit 1; }

# Outside the repository, so that only the installed copy is importable.
cd "$tmp/run"
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
where=$("$py" -c 'import mpiml; print(mpiml.__file__)')
case "$where" in
  "$site"/mpiml/__init__.py) echo "mpiml imported from $where" ;;
  *) echo "check_wheel: mpiml imported from $where, not from $site" >&2; exit 1 ;;
esac

echo "== mpiexec -n 2 python -m mpiml.train (1 epoch, digits)"
log=$tmp/train.log
timeout 300 "$mpiexec" -n 2 "$py" -m mpiml.train --epochs 1 --no-progress < /dev/null 2>&1 | tee "$log"
grep -Eq '^final: test accuracy [0-9.]+%' "$log" \
  || { echo "check_wheel: mpiml.train printed no final accuracy line" >&2; exit 1; }

echo "== mpiexec -n 2: mpiml.collectives.allreduce against comm.Allreduce"
check='
import sys
import numpy as np
from mpi4py import MPI
import mpiml
from mpiml import collectives
site = sys.argv[1]
assert mpiml.__file__ == site + "/mpiml/__init__.py", mpiml.__file__
comm = MPI.COMM_WORLD
rng = np.random.default_rng(1234 + comm.Get_rank())
x = rng.standard_normal(100_003).astype(np.float32)
want = np.empty_like(x)
comm.Allreduce(x, want, op=MPI.SUM)
for algorithm in ("mpi", "ring", "tree", "butterfly"):
    got = collectives.allreduce(x.copy(), op="sum", algorithm=algorithm)
    assert got.dtype == np.float32, got.dtype
    assert np.allclose(got, want, rtol=1e-6, atol=1e-6), (algorithm, float(np.abs(got - want).max()))
if comm.Get_rank() == 0:
    print(f"allreduce matches comm.Allreduce at {comm.Get_size()} ranks (mpi, ring, tree, butterfly)")
'
timeout 120 "$mpiexec" -n 2 "$py" -c "$check" "$site" < /dev/null
