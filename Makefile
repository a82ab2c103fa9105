# The two set-up commands: `make demo` and `make test`. Both create .venv and install
# everything they need (torch pinned to the CPU build on the install line only).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
EXTRAS  ?= cpu,spark,dev
TORCH   ?= torch==2.13.0

export RAY_AUTH_MODE ?= disabled
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S ?= 0.25
export PYTHONUNBUFFERED := 1

.PHONY: install demo test lint clean

# The venv's own pip on purpose: pip 26.3 resolves `torch==2.13.0` beside the project's
# `torch>=2.3` to the CUDA build from the index (several GB) instead of the CPU wheel on disk.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH) -e '.[$(EXTRAS)]'
	$(BIN)/python -c "import torch; print('torch', torch.__version__)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/semid build --config conf/demo.yaml
	$(BIN)/semid versions list --root out/demo --table sids

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check semid_dist jobs tests scripts

clean:
	rm -rf $(VENV) out .pytest_cache
