# jax_rlhf: `make test` and `make demo` bootstrap .venv from the pinned versions in pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)  ## the whole suite, the 25 slowest tests listed last (613 tests, 13 min 0 s on 2 CPU cores from a clean clone, 2026-12-05; tests/conftest.py compiles XLA:CPU fast)
	$(PY) -m pytest -q --durations=25

test-fast: $(STAMP)  ## everything but the end-to-end pipeline test
	$(PY) -m pytest -q -m 'not slow'

demo: $(STAMP)  ## the whole InstructGPT pipeline on instruct_world, into runs/demo; prints the results table
	$(PY) -m jax_rlhf.main --config configs/pipeline.py --workdir runs/demo

bench: $(STAMP)  ## throughput vs the PyTorch yardstick (../shared/peer)
	$(PY) -m bench.generate --peer
	$(PY) -m bench.lm_step --peer
	$(PY) -m bench.ppo_iteration --peer

clean:
	rm -rf $(VENV) runs .pytest_cache
