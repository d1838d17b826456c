# One virtualenv for everything. On a CPU-only Linux box torch==2.13.0 is the CPU wheel (served from
# local disk here); on a GPU box an already installed CUDA torch is kept (see README).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint gate baseline accuracy clean

$(BIN)/peftprof: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then \
	  echo "keeping the installed CUDA torch"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q torch; \
	else \
	  $(BIN)/python -m pip install -q torch==2.13.0; \
	fi
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/peftprof

demo: setup
	$(BIN)/peftprof run scenarios/quickstart.toml

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

# The project's own memory gate: shipped scenarios against the committed baseline of their estimates.
gate: setup
	$(BIN)/peftprof estimate scenarios/*.toml --format json > .current-estimates.json
	$(BIN)/peftprof gate .current-estimates.json --baseline benchmarks/baseline/estimates.json --exact
	rm -f .current-estimates.json

baseline: setup
	$(BIN)/peftprof estimate scenarios/*.toml --format json > benchmarks/baseline/estimates.json

# The full estimator accuracy benchmark (150 generated scenarios trained on CPU: 60-79 under autocast, 80-149 the families of issue #14; ~20 min
# on 2 cores): before each release, weekly, and on any change to peftprof/estimate or peftprof/run. Rewrites
# benchmarks/results/accuracy.*
accuracy: setup
	$(BIN)/python benchmarks/accuracy.py --n 150 --seed 0

clean:
	rm -rf $(VENV) reports/*.html reports/*.jsonl .peftprof-cache
