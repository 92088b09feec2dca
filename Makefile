# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned to builds this machine installs from local files: an unpinned torch (asked for by lightning)
# would download a CUDA build of several GB. The dev venv takes torch 2.14.1 with torchvision 0.29.1 (a CUDA build,
# ~5.5 GB, from local files) because timm, which the tests use for real models, imports torchvision, and PyPI's
# torchvision does not import beside the 2.13.0 CPU build. The wheel smoke test installs the small CPU build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
SMOKE_TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint typecheck bench wheel-smoke clean gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[wandb,examples,dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) lint
	$(PY) -m pytest -q
	$(MAKE) wheel-smoke

# The wheel as a user gets it: built from the tree, installed into a fresh venv outside the repository (torch
# first, as above), then a few training steps with the three callbacks from a directory outside the repository.
wheel-smoke: $(STAMP)
	rm -rf dist
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir dist .
	ls dist/lightning_bn-*-py3-none-any.whl
	set -e; smoke=$$(mktemp -d -t lightning-bn-wheel-XXXXXX); trap 'rm -rf "$$smoke"' EXIT; \
	$(PYTHON) -m venv "$$smoke/venv"; \
	"$$smoke/venv/bin/python" -m pip install --quiet $(SMOKE_TORCH_SPEC); \
	"$$smoke/venv/bin/python" -m pip install --quiet dist/lightning_bn-*-py3-none-any.whl; \
	cp scripts/wheel_smoke.py "$$smoke/"; \
	cd "$$smoke" && venv/bin/python wheel_smoke.py "$$smoke/logs"

demo: $(STAMP)
	$(PY) -m examples.demo

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# Everything that needs a GPU (tests/test_cuda.py and the benchmarks' CUDA rows) in one run of under 8 minutes,
# log and table to $(OUT). No venv set-up (a GPU machine runs the package from the tree, offline): the venv's
# python where there is one, else $(PYTHON). Fails at once, saying so, where torch sees no CUDA device.
gpu-check:
	@test -n "$(OUT)" || { echo "usage: make gpu-check OUT=<folder for gpu_check.log and gpu_check.md>" >&2; exit 2; }
	PYTHONPATH=. $(if $(wildcard $(PY)),$(PY),$(PYTHON)) scripts/gpu_check.py --out "$(OUT)"

clean:
	rm -rf $(VENV) lightning_logs wandb .pytest_cache .ruff_cache .mypy_cache demo_logs dist build
