# clipbd — `make setup` (once), then `make test`, `make run`, `make bench`.
# Everything runs from the virtual environment at .venv in this checkout.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-fast run smoke bench clean help

help:
	@echo "make setup      create .venv and install clipbd with pinned dependencies (quick when done)"
	@echo "make test       run the test suite (what CI runs)"
	@echo "make test-fast  unit/config/data tests only (skips slow end-to-end and SLURM tests)"
	@echo "make run        run the default experiment into outputs/default"
	@echo "make smoke      a seconds-long end-to-end run into outputs/smoke"
	@echo "make bench      detector, decomposition and pipeline benchmarks; results under experiments/bench/"

setup: $(VENV)/.clipbd-installed

# Re-installs only when the dependency pins or the package metadata change.
$(VENV)/.clipbd-installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(PY) -c "import clipbd, open_clip, torch, torchvision, hydra, webdataset, h5py, sklearn, wandb, faiss, submitit"
	touch $@

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS)

run: setup
	$(PY) -m clipbd.run hydra.run.dir=outputs/default

smoke: setup
	$(PY) -m clipbd.run +experiment=smoke hydra.run.dir=outputs/smoke

# Sizes of the global-reference-set benchmark (the issue's target is 1M x 1M at d=512).
GLOBAL_N ?= 200000 1000000

bench: setup
	$(PY) benchmarks/bench_knn.py
	$(PY) benchmarks/bench_global.py --n $(GLOBAL_N) --nprobe 8
	$(PY) benchmarks/bench_decompose.py
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_step.py

clean:
	rm -rf outputs multirun .pytest_cache
