#!/usr/bin/env bash
# Run Horovod's own PyTorch suite (test/parallel/test_torch.py) against mpiml.torch.
#
#   scripts/horovod_suite.sh PATH_TO_HOROVOD [TEST_NAME ...]
#
# The file is copied to a temporary directory with its one import changed to
# `import mpiml.torch as hvd`, next to a small stand-in for Horovod's
# test/utils/common.py (the real one needs Horovod's runner). Each test then
# runs alone under `mpiexec -n $NP` with a time limit, and one line per test
# says PASS, FAIL, HANG (killed at the limit) or SKIP; a summary ends the run.
#
# The selection leaves out what mpiml.torch does not provide (GPU, process
# sets, elastic, timeline, Adasum, sparse, alltoall, reducescatter and the
# local/cross tests); name tests on the command line, or set ALL=1, to run
# others. Not part of CI: the suite is Horovod's, not ours to vendor.
#
# Settings (environment): PYTHON (default .venv/bin/python), MPIEXEC (default
# the mpiexec next to PYTHON), MPIEXEC_ARGS (e.g. --oversubscribe for Open
# MPI), NP (2), TIMEOUT (seconds per test, 300), KEEP=1 keeps the logs.
set -u

usage() { echo "usage: $0 PATH_TO_HOROVOD [TEST_NAME ...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
horovod=$1; shift
source_file=$horovod/test/parallel/test_torch.py
[ -f "$source_file" ] || { echo "$0: error: no $source_file (is $horovod a Horovod checkout?)" >&2; exit 2; }

here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
mpiexec=${MPIEXEC:-$(dirname "$python")/mpiexec}
np=${NP:-2}
limit=${TIMEOUT:-300}
[ -x "$python" ] || { echo "$0: error: no Python at $python (set PYTHON)" >&2; exit 2; }
[ -x "$mpiexec" ] || { echo "$0: error: no mpiexec at $mpiexec (set MPIEXEC)" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/horovod-suite.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "logs in $work/logs"; else trap 'rm -rf "$work"' EXIT; fi
mkdir -p "$work/parallel" "$work/utils" "$work/logs"
sed -E 's/^import horovod\.torch as hvd$/import mpiml.torch as hvd/' "$source_file" > "$work/parallel/test_torch.py"
grep -q '^import mpiml.torch as hvd$' "$work/parallel/test_torch.py" \
    || { echo "$0: error: $source_file has no 'import horovod.torch as hvd' line to rewrite" >&2; exit 2; }

cat > "$work/utils/common.py" <<'EOF'
"""What test_torch.py imports from Horovod's test/utils/common.py, without Horovod's runner."""
import contextlib
import os
import shutil
import tempfile


def mpi_env_rank_and_size():
    for rank, size in (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")):
        if os.environ.get(rank) is not None and os.environ.get(size) is not None:
            return int(os.environ[rank]), int(os.environ[size])
    return 0, 1


def skip_or_fail_gpu_test(test, message):
    if int(os.environ.get("HOROVOD_TEST_GPU", 0)):
        test.fail(message)
    test.skipTest(message)


@contextlib.contextmanager
def temppath():
    path = tempfile.mktemp()
    try:
        yield path
    finally:
        if os.path.isfile(path):
            os.remove(path)
        elif os.path.exists(path):
            shutil.rmtree(path)
EOF

# Every test method of TorchTests, in file order (read with ast: nothing is imported).
mapfile -t all_tests < <("$python" - "$work/parallel/test_torch.py" <<'EOF'
import ast, sys
tree = ast.parse(open(sys.argv[1], encoding="utf-8").read())
for node in tree.body:
    if isinstance(node, ast.ClassDef) and node.name == "TorchTests":
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name.startswith("test_"):
                print(item.name)
EOF
)
excluded='gpu|cuda|process_set|elastic|timeline|adasum|delta_optimizer|sparse|alltoall|reducescatter|local_rank|local_size|cross_rank|cross_size|model_parallelism|sync_batch_norm'
if [ $# -gt 0 ]; then
    selected=("$@")
elif [ "${ALL:-0}" = 1 ]; then
    selected=("${all_tests[@]}")
else
    selected=()
    for t in "${all_tests[@]}"; do [[ $t =~ $excluded ]] || selected+=("$t"); done
fi

passed=0 failed=0 hung=0 skipped=0
failures=()
for t in "${selected[@]}"; do
    log=$work/logs/$t.log
    start=$(date +%s)
    # shellcheck disable=SC2086 # MPIEXEC_ARGS is a list of words
    (cd "$work/parallel" && timeout -k 10 "$limit" "$mpiexec" ${MPIEXEC_ARGS:-} -n "$np" "$python" -m pytest -q \
        -p no:cacheprovider "test_torch.py::TorchTests::$t" < /dev/null > "$log" 2>&1)
    rc=$?
    took=$(( $(date +%s) - start ))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status=HANG; hung=$((hung + 1)); failures+=("$t")
    elif [ $rc -ne 0 ]; then
        status=FAIL; failed=$((failed + 1)); failures+=("$t")
    elif grep -q ' skipped' "$log" && ! grep -q ' passed' "$log"; then
        status=SKIP; skipped=$((skipped + 1))
    else
        status=PASS; passed=$((passed + 1))
    fi
    why=""
    if [ "$status" = FAIL ]; then
        why=$(grep -m1 -E '^E  ' "$log" || grep -m1 -E 'Error|EXIT CODE' "$log")
        why=$(echo "$why" | sed -E 's/^E +//' | cut -c1-150)
        [ -n "$why" ] || why="exit status $rc"
        why=" -- $why"
    elif [ "$status" = SKIP ]; then
        why=$(grep -m1 -oE 'SKIPPED.*|skipped.*' "$log" | cut -c1-120)
        [ -n "$why" ] && why=" -- $why"
    fi
    printf '%-4s %-55s %4ss%s\n' "$status" "$t" "$took" "$why"
done

echo
echo "$passed passed, $failed failed, $hung hung, $skipped skipped" \
     "(${#selected[@]} run of ${#all_tests[@]} tests in the file)"
[ ${#failures[@]} -eq 0 ] || echo "not passing: ${failures[*]}"
[ $failed -eq 0 ] && [ $hung -eq 0 ]
